"""Throughput of the synthetic dataset generator against its 500 images/s target (one core).

Run: ``python bench/bench_synthetic.py [--quick] [--json PATH]``. Rows: wall-clock images/s with 1 and 2
workers (drawing, JPEG encoding and writing included), plus the single-worker rate by process CPU time,
which is less sensitive to other jobs on a shared machine. ``--dir`` chooses where the images are
written (default: the system temporary folder); file creation there is part of the measured cost.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from common import bench_main

from irra_dist.synthetic.dataset import generate_synthetic_dataset

TARGET_IMAGES_PER_S = 500.0


def _count_images(folder: Path) -> int:
    return sum(1 for _ in (folder / "imgs").rglob("*.jpg"))


def _measure(num_ids: int, workers: int, root: Path) -> tuple[int, float, float]:
    """Generate ``num_ids`` identities; return (images, wall seconds, CPU seconds of this process)."""
    out = root / f"ds_{workers}"
    wall, cpu = time.perf_counter(), time.process_time()
    generate_synthetic_dataset(out, num_train_ids=num_ids, num_val_ids=0, num_test_ids=0, seed=1,
                               workers=workers, overwrite=True)
    return _count_images(out), time.perf_counter() - wall, time.process_time() - cpu


def run(quick: bool, workdir: str | None = None) -> list[dict]:
    """Measure the generator; returns bench rows (name, value, unit, baseline, ratio, images).

    Args:
        quick: about 450 images per row instead of about 2100 (the demo's default size).
        workdir: folder for the temporary output (default: the system temporary folder).
    """
    num_ids = 150 if quick else 700
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        _measure(10, 1, root)  # warm up imports, caches and the noise bank
        for workers in (1, 2):
            images, wall, cpu = _measure(num_ids, workers, root)
            rows.append({"name": f"generate, {workers} worker(s), wall clock", "value": images / wall,
                         "unit": "images/s", "baseline": TARGET_IMAGES_PER_S,
                         "ratio": images / wall / TARGET_IMAGES_PER_S, "images": images})
            if workers == 1:
                rows.append({"name": "generate, 1 worker, process CPU time", "value": images / cpu,
                             "unit": "images/s", "baseline": TARGET_IMAGES_PER_S,
                             "ratio": images / cpu / TARGET_IMAGES_PER_S, "images": images})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line: print the table, optionally write the rows as JSON."""
    options = [("--dir", {"dest": "workdir",
                          "help": "folder to write the images under (default: the system temp folder)"})]
    return bench_main(run, __doc__, argv, extra_args=options, labels={"baseline": "target"})


if __name__ == "__main__":
    sys.exit(main())
