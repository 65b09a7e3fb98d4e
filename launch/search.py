"""Free-text person search: ``python launch/search.py --run RUN_DIR --query "a woman in a red coat"``.

The same entry point as the ``irra-search`` console script (:func:`irra_dist.engine.search_cli.main`).
"""

from __future__ import annotations

import sys

from irra_dist.engine import search_cli


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default ``sys.argv[1:]``), search and write the PNG grid; returns the exit status."""
    return search_cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
