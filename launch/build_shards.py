"""Build WebDataset shards: ``python launch/build_shards.py --dataset cuhk --root DIR --out DIR``.

The same entry point as the ``irra-build-shards`` console script
(:func:`irra_dist.engine.build_shards_cli.main`).
"""

from __future__ import annotations

import sys

from irra_dist.engine import build_shards_cli


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default ``sys.argv[1:]``) and build the shards; returns the exit status."""
    return build_shards_cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
