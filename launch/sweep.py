"""Train one run per seed and report them:
``python launch/sweep.py --seeds 1 2 3 [--parallel-gpus] -- [irra-train arguments]``.

The same entry point as ``irra-sweep`` (:func:`irra_dist.engine.sweep.main`); README.md, "Reporting results".
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import irra_dist  # noqa: F401
except ModuleNotFoundError:  # running from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irra_dist.engine.sweep import main

if __name__ == "__main__":
    sys.exit(main())
