"""Build WebDataset shards: ``python launch/build_shards.py --dataset cuhk --root DIR --out DIR``.

The same entry point as the ``irra-build-shards`` console script (:func:`irra_dist.data.shards.main`).
"""

from __future__ import annotations

import sys

from irra_dist.data import shards


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default ``sys.argv[1:]``) and build the shards; returns the exit status."""
    return shards.main(argv)


if __name__ == "__main__":
    sys.exit(main())
