"""Build a gallery index: ``python launch/index.py build RUN --gallery FOLDER --out INDEX_DIR``.

Every GPU: ``accelerate launch --multi_gpu --num_processes N launch/index.py build ...``. The same entry point
as ``irra-index`` (:func:`irra_dist.engine.index_cli.main`).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import irra_dist  # noqa: F401
except ModuleNotFoundError:  # running from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irra_dist.engine.index_cli import main as index_main


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default ``sys.argv[1:]``) and build the index; returns the exit status."""
    return index_main(argv)


if __name__ == "__main__":
    sys.exit(main())
