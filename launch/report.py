"""Mean +/- std over runs per selection rule: ``python launch/report.py RUN... [--out DIR] [--allow-mixed]``.

Same entry point as ``irra-report`` (:func:`irra_dist.engine.report.main`); README.md, "Reporting results".
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import irra_dist  # noqa: F401
except ModuleNotFoundError:  # running from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irra_dist.engine.report import main

if __name__ == "__main__":
    sys.exit(main())
