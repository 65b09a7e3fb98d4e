"""Evaluate retrieval: ``python launch/evaluate.py TARGET [--shards DIR] [--split test] [--out FILE]``.

TARGET is a run folder, a checkpoint folder, a .safetensors weights file or an official IRRA best.pth.
Several processes: ``accelerate launch --multi_gpu --num_processes N launch/evaluate.py ...``. The same
entry point as ``irra-eval`` (:func:`irra_dist.engine.cli.evaluate_main`).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import irra_dist  # noqa: F401
except ModuleNotFoundError:  # running from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irra_dist.engine.cli import evaluate_main


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default ``sys.argv[1:]``) and evaluate; returns the exit status."""
    return evaluate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
