"""Train IRRA: ``accelerate launch launch/train.py [--config RECIPE] [key=value ...] [--resume [PATH]]``.

With no arguments it trains the demo recipe (configs/demo.yaml). The same entry point as ``irra-train``
(:func:`irra_dist.engine.cli.train_main`); launch lines for one GPU, several GPUs, DeepSpeed and CPU are in
docs/TRAINING.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import irra_dist  # noqa: F401
except ModuleNotFoundError:  # running from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irra_dist.engine.cli import train_main


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default ``sys.argv[1:]``) and train; returns the exit status."""
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
