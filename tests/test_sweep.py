"""irra-sweep through the real command (one training process per seed) and the selection protocol of a run:
val-selected runs touch test once at the end, test-selected runs record val at every epoch."""

from __future__ import annotations

import csv
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env

from irra_dist.config import load_config
from irra_dist.engine.runlog import read_metrics


def _run(cmd: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _first_best_epoch(rows: list[dict], split: str) -> int:
    evals = [(row["epoch"], row["metrics"]["t2i"]["R1"]) for row in rows
             if row["kind"] == "eval" and row["split"] == split]
    return max(evals, key=lambda item: (item[1], -item[0]))[0]


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate")
def test_two_seed_sweep_runs_each_seed_and_reports_the_val_selected_test_results(make_tiny_recipe,
                                                                                   tmp_path: Path) -> None:
    recipe = make_tiny_recipe(tmp_path)
    # Both seeds at once (--jobs 2), one thread each: the two cores of the test machine.
    proc = _run([sys.executable, "launch/sweep.py", "--seeds", "1", "2", "--jobs", "2", "--name", "sw", "--",
                 "--config", str(recipe), "train.num_epochs=2", "train.cpu_threads=1", "eval.split=val"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    sweep = tmp_path / "runs" / "sw"
    best_r1 = []
    for seed in (1, 2):
        run = sweep / f"seed{seed}"
        cfg = load_config(run / "config.yaml")
        assert (cfg.train.seed, cfg.logging.group, cfg.eval.split) == (seed, "sw", "val")
        rows = read_metrics(run / "metrics.jsonl")
        assert {row["split"] for row in rows if row["kind"] == "eval"} == {"val"}  # test never per epoch
        finals = {row["weights"]: row for row in rows if row["kind"] == "final"}
        assert finals["best"]["epoch"] == _first_best_epoch(rows, "val") and finals["last"]["epoch"] == 2
        best_r1.append(finals["best"]["metrics"]["t2i"]["R1"])
        if seed == 1:
            # The final test row of `best` against an independent evaluation of best.safetensors (irra-eval).
            from irra_dist.engine.evaluate import evaluate_target

            result = evaluate_target(run, split="test", weights="best", num_workers=0, batch_size=8)
            assert result["metrics"]["t2i"] == pytest.approx(finals["best"]["metrics"]["t2i"], abs=1e-4)
    losses = [[row["loss"] for row in read_metrics(sweep / f"seed{s}" / "metrics.jsonl")
               if row["kind"] == "train"] for s in (1, 2)]
    assert losses[0] != losses[1]  # the seeds made different runs
    with (sweep / "report.csv").open() as f:
        table = {row["selection"]: row for row in csv.DictReader(f)}
    assert list(table) == ["best_on_val", "last"] and table["best_on_val"]["n"] == "2"
    assert float(table["best_on_val"]["R1_mean"]) == pytest.approx(statistics.fmean(best_r1), abs=1e-4)
    assert float(table["best_on_val"]["R1_std"]) == pytest.approx(abs(best_r1[0] - best_r1[1]) / 2 ** 0.5,
                                                                  abs=1e-4)
    assert (sweep / "curves.png").stat().st_size > 0 and "| best-on-val | 2 |" in proc.stdout
    assert (sweep / "seed1.log").is_file()  # parallel runs log to files, not to the console


def test_sweep_refuses_a_seed_override_in_one_line(tiny_recipe: Path, capsys) -> None:
    from irra_dist.engine.sweep import main

    assert main(["--seeds", "1", "2", "--", "--config", str(tiny_recipe), "train.seed=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.seed=4" in err
    assert not (tiny_recipe.parent / "runs").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate")
def test_test_selected_run_records_val_every_epoch_and_never_a_final_row(tiny_recipe: Path) -> None:
    from irra_dist.engine.cli import train_main
    from irra_dist.evaluation.selection import select_results

    assert train_main(["--config", str(tiny_recipe), "train.run_name=official", "train.num_epochs=2",
                       "eval.split=test", "eval.track_splits=[val]"]) == 0
    rows = read_metrics(tiny_recipe.parent / "runs" / "official" / "metrics.jsonl")
    evals = [(row["epoch"], row["split"], row["selects"]) for row in rows if row["kind"] == "eval"]
    assert evals == [(1, "test", True), (1, "val", False), (2, "test", True), (2, "val", False)]
    assert not [row for row in rows if row["kind"] == "final"] and rows[-1]["kind"] == "complete"
    results = select_results(rows)
    assert results["best_on_val"]["epoch"] == _first_best_epoch(rows, "val")
    assert results["best_on_test"]["epoch"] == _first_best_epoch(rows, "test")
    assert results["last"]["epoch"] == 2


@pytest.mark.parametrize("visible", [None, "1,2"])
def test_free_gpus_are_those_without_a_compute_process(tmp_path: Path, monkeypatch, visible) -> None:
    from irra_dist.engine.sweep import free_gpus

    # No GPU here: an nvidia-smi stand-in answering the two queries free_gpus makes (4 GPUs, GPU 2 busy).
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\ncase \"$1\" in\n"
                    "  --query-gpu=*) printf '0, GPU-a\\n1, GPU-b\\n2, GPU-c\\n3, GPU-d\\n' ;;\n"
                    "  --query-compute-apps=*) printf 'GPU-c\\n' ;;\nesac\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert free_gpus() == (["0", "1", "3"] if visible is None else ["1"])


def test_seeds_share_the_slots_one_run_per_gpu_at_a_time(tmp_path: Path) -> None:
    from irra_dist.engine.sweep import run_seeds

    # Each "run" records its GPU and start/end times; 3 seeds on 2 GPUs: never two runs on one GPU at once.
    script = ("import os, sys, time; start = time.time(); time.sleep(0.5); "
              "print(os.environ['CUDA_VISIBLE_DEVICES'], start, time.time()); sys.exit(int(sys.argv[1]))")
    commands = {seed: [sys.executable, "-c", script, "3" if seed == 2 else "0"] for seed in (1, 2, 3)}
    status = run_seeds(commands, ["0", "1"], tmp_path)
    assert status == {1: 0, 2: 3, 3: 0}
    spans = [(gpu, float(a), float(b)) for gpu, a, b in
             (((tmp_path / f"seed{s}.log").read_text().split()) for s in (1, 2, 3))]
    assert {gpu for gpu, _, _ in spans} == {"0", "1"}
    for i, (gpu, start, end) in enumerate(spans):
        for other_gpu, other_start, other_end in spans[i + 1:]:
            if gpu == other_gpu:
                assert end <= other_start or other_end <= start
