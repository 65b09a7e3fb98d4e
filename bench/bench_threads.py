"""CPU threads on a shared machine: the demo model trained beside another busy job, by thread setting.

Run: ``python bench/bench_threads.py [--quick] [--json PATH]``. A second process keeps one core busy (a
pure-Python loop, like another user's job) while one training process trains the demo recipe's model and
batch for a fixed number of optimizer steps with ``train.cpu_threads`` set to every usable core (the old
default), to 1, and to 0 (the default: usable cores minus the 1-minute load average). The value is the
median of the per-step samples/s the trainer logs after warm-up steps; the baseline is "every core". The
busy job runs for a while before the first training, so that the load average sees it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_train import QUICK_GLOBAL_BATCH, _build_shards
from common import REPO_ROOT, bench_main

from irra_dist.config import load_config, resolve_recipe
from irra_dist.engine.accel import usable_cores

BUSY_LOOP = "while True: pass"


def _train(shards: Path, out: Path, name: str, threads: int, warmup: int, steps: int, global_batch: int,
           ) -> float:
    import json
    import statistics

    args = [f"data.shards={shards}", f"train.output_dir={out}", f"train.run_name={name}",
            f"train.batch_size={global_batch}", f"train.max_steps={warmup + steps}", "train.log_period=1",
            f"train.cpu_threads={threads}", "eval.eval_period=0", "data.num_workers=1", "--no-wandb"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), WANDB_MODE="offline")
    done = subprocess.run([sys.executable, "launch/train.py", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(row["samples_per_s"] for row in rows if row["kind"] == "train"
                             and row["step"] > warmup)


def run(quick: bool) -> list[dict]:
    """Rows: name, value (samples/s), unit, baseline (every usable core), ratio."""
    warmup, steps = (1, 3) if quick else (2, 20)
    global_batch = QUICK_GLOBAL_BATCH if quick else load_config(resolve_recipe("demo")).train.batch_size
    cores = usable_cores()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still stops its busy job
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], start_new_session=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            shards = _build_shards(root)
            time.sleep(5 if quick else 60)  # let the 1-minute load average see the busy job
            setups = [(f"{cores} threads (every usable core)", cores), ("1 thread", 1),
                      ("default (train.cpu_threads=0)", 0)]
            results = [(label, _train(shards, root / "runs", f"t{threads}", threads, warmup, steps,
                                      global_batch)) for label, threads in setups]
    finally:
        busy.kill()
        busy.wait()
    base = results[0][1]
    load = os.getloadavg()[0]
    return [{"name": f"demo model beside a busy job, {label}", "value": speed, "unit": "samples/s",
             "baseline": base, "ratio": speed / base, "usable_cores": cores,
             "load_1min_after": round(load, 1)}
            for label, speed in results]


def main(argv: list[str] | None = None) -> int:
    return bench_main(run, __doc__, argv, extra_columns=("usable_cores", "load_1min_after"))


if __name__ == "__main__":
    sys.exit(main())
