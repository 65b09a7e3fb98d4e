"""Training throughput of the demo-sized model on the CPU: 1 process against 2 processes (gloo DDP).

Run: ``python bench/bench_train.py [--quick] [--json PATH]``. Every run trains the demo recipe's model and
batch (configs/demo.yaml: 128 wide, 4 layers, 96x32 images, global batch 64, SDM + ID + MLM) on a small
synthetic shard set, with evaluation and W&B off, for a fixed number of optimizer steps. The value is the
median of the per-step samples/s the trainer logs (metrics.jsonl) after warm-up steps.
The baseline is 1 process with PyTorch's default intra-op threads (one per core); 1 process with one thread
and 2 processes with one thread each (as Accelerate sets it for CPU processes) are compared with it. All
runs keep the demo's global batch of 64 (``--quick``: a global batch of 16 and 2 timed steps, since each
run's start-up of several seconds dominates there). No accuracy is measured here.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO_ROOT, bench_main

from irra_dist.config import load_config, resolve_recipe

QUICK_GLOBAL_BATCH = 16
"""Global batch of --quick runs (the full run keeps the demo's 64); even, so that 2 processes split it."""


def _build_shards(root: Path) -> Path:
    from irra_dist.data.shards import build_shards
    from irra_dist.synthetic.dataset import generate_synthetic_dataset

    generate_synthetic_dataset(root / "CUHK-PEDES", num_train_ids=80, num_val_ids=0, num_test_ids=5, seed=1,
                               workers=2)
    out = root / "shards"
    build_shards("CUHK-PEDES", root, out)
    return out


def _train(processes: int, shards: Path, out: Path, warmup: int, steps: int, global_batch: int,
           threads: int | None = None) -> tuple[float, float]:
    """Train `warmup` + `steps` steps with `processes` processes (and `threads` intra-op threads each, None:
    the default) at `global_batch`; return (median samples/s of the last `steps` steps, wall seconds)."""
    per_device = global_batch // processes
    name = f"p{processes}_t{threads or 0}"
    args = [f"data.shards={shards}", f"train.output_dir={out}", f"train.run_name={name}",
            f"train.batch_size={per_device}", f"train.max_steps={warmup + steps}", "train.log_period=1",
            "eval.eval_period=0", "data.num_workers=1", "--no-wandb"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), WANDB_MODE="offline")
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if processes == 1:
        cmd = [sys.executable, "launch/train.py", *args]
    else:
        cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
               "accelerate_configs/cpu_2proc.yaml", "--num_processes", str(processes), "launch/train.py",
               *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{processes}-process training failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    speeds = [row["samples_per_s"] for row in rows if row["kind"] == "train" and row["step"] > warmup]
    return statistics.median(speeds), wall


def run(quick: bool) -> list[dict]:
    """Measure 1 and 2 processes; rows: name, value (samples/s), unit, baseline (1 process), ratio.

    Args:
        quick: 1 warm-up and 2 timed steps at a global batch of 16 instead of 2 and 20 at 64.
    """
    warmup, steps = (1, 2) if quick else (2, 20)
    global_batch = QUICK_GLOBAL_BATCH if quick else load_config(resolve_recipe("demo")).train.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = _build_shards(root)
        # (label, processes, threads per process); the first is the baseline.
        setups = [("1 process, default threads", 1, None), ("1 process, 1 thread", 1, 1),
                  ("2 processes (DDP, gloo), 1 thread each", 2, None)]
        results = [(label, *_train(p, shards, root / "runs", warmup, steps, global_batch, t))
                   for label, p, t in setups]
    base = results[0][1]
    return [{"name": f"demo model, {label}", "value": speed, "unit": "samples/s", "baseline": base,
             "ratio": speed / base, "steps": steps, "global_batch": global_batch, "wall_s": wall}
            for label, speed, wall in results]


def main(argv: list[str] | None = None) -> int:
    """Command line: print the table, optionally write the rows as JSON."""
    return bench_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
