"""ZeRO-3 and two machines train like one process; ZeRO-3 evaluates uneven parts, resumes and exports.

A shard set of its own: the tiny training set (65 samples: 5 steps of a global batch 16, the last with ONE
sample) and a test split of 3 identities x 5 images (15 gallery images, 15 queries), an odd count, so that
2 ranks hold 8 and 7 items: with ``eval.batch_size=7`` rank 0 embeds 2 batches and rank 1 only one.

Runs, shared by the module:

* ``ref``: one process, batch 16, in this process (the reference);
* ``zero3``: DeepSpeed ZeRO-3, 2 x 8, stopped after step 3 (``train.max_steps=3``) and resumed from its
  checkpoint to the end of the epoch, where it evaluates with the uneven parts above;
* ``two_machines``: two ``accelerate launch`` of ``accelerate_configs/multi_node.yaml`` (machine ranks 0 and
  1, one process each) on 127.0.0.1, 2 x 8.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY_RECIPE, free_port, subprocess_env, train_reference
from safetensors.torch import load_file

from irra_dist.engine.runlog import read_metrics

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate")]

LOSS_KEYS = ("loss", "sdm_loss", "id_loss", "mlm_loss")
TWO_BY_EIGHT = ["train.batch_size=8", "eval.batch_size=7"]


def _train_rows(run_dir: Path) -> dict[int, dict]:
    """Step -> row (a step logged again after a resume keeps its last row)."""
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def _eval_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]


def _two_machines(recipe: Path, name: str) -> list[subprocess.CompletedProcess]:
    """Both machine ranks of multi_node.yaml at once, one process each, rendezvous on 127.0.0.1."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    port = str(free_port())
    procs = []
    for machine in (0, 1):
        cmd = [accelerate, "launch", "--config_file", "accelerate_configs/multi_node.yaml",
               "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine),
               "--main_process_ip", "127.0.0.1", "--main_process_port", port,
               "launch/train.py", "--config", str(recipe), f"train.run_name={name}", *TWO_BY_EIGHT]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"the two-machine launch ran over 400 s and was killed: {proc.args}")
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, launch) -> dict[str, Path]:
    from irra_dist.data.shards import build_shards
    from irra_dist.synthetic.dataset import generate_synthetic_dataset

    tmp = tmp_path_factory.mktemp("zero3")
    generate_synthetic_dataset(tmp / "CUHK-PEDES", num_train_ids=13, num_val_ids=2, num_test_ids=3,
                               images_per_id=(5, 5), captions_per_image=1, seed=3)
    build_shards("CUHK-PEDES", tmp, tmp / "shards", shard_size=16, workers=2)
    recipe = tmp / "tiny.yaml"
    data = {**TINY_RECIPE["data"], "shards": str(tmp / "shards")}
    train_section = {**TINY_RECIPE["train"], "output_dir": str(tmp / "runs")}
    recipe.write_text(yaml.safe_dump({**TINY_RECIPE, "data": data, "train": train_section}))
    out = {"ref": train_reference(recipe)}

    ds = ["--num_processes", "2"]
    zero3 = tmp / "runs" / "zero3"
    done = launch("deepspeed_zero3.yaml", "train.py",
                  ["--config", str(recipe), "train.run_name=zero3", "train.max_steps=3", *TWO_BY_EIGHT],
                  launcher_args=ds)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert sorted(_train_rows(zero3)) == [1, 2, 3]
    done = launch("deepspeed_zero3.yaml", "train.py", ["--resume", str(zero3), "train.max_steps=0"],
                  launcher_args=ds, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    out["zero3"] = zero3

    for machine in _two_machines(recipe, "two_machines"):
        assert machine.returncode == 0, machine.stdout[-5000:]
    out["two_machines"] = tmp / "runs" / "two_machines"
    return out


@pytest.mark.parametrize("name", ["zero3", "two_machines"])
def test_two_processes_give_the_single_process_losses_and_weights(runs: dict[str, Path], name: str) -> None:
    ref, other = _train_rows(runs["ref"]), _train_rows(runs[name])
    assert sorted(ref) == sorted(other) == [1, 2, 3, 4, 5]
    for step in ref:
        for key in LOSS_KEYS:
            assert other[step][key] == pytest.approx(ref[step][key], rel=1e-5), (name, step, key)
    a, b = load_file(runs["ref"] / "model.safetensors"), load_file(runs[name] / "model.safetensors")
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert b[key].dtype == torch.float32, key
        torch.testing.assert_close(b[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_zero3_resumed_mid_epoch(runs: dict[str, Path]) -> None:
    """The run stopped after step 3 continued from its checkpoint with the step-4 batch (not a new epoch)."""
    rows = _train_rows(runs["zero3"])
    assert rows[5]["epoch"] == 1
    log = (runs["zero3"] / "train_log.txt").read_text()
    assert "resumed from" in log and "epoch 1, batch 3, step 3" in log


def test_zero3_evaluation_of_uneven_parts_equals_a_single_process_evaluation(runs: dict[str, Path]) -> None:
    """Rank 0 embedded 2 batches and rank 1 one under ZeRO-3 (no hang), with the single-process result; the
    exported weights load in irra-eval's code path (evaluate_target), which scores them alike."""
    from irra_dist.engine.evaluate import evaluate_target

    (row,) = _eval_rows(runs["zero3"])
    (ref_row,) = _eval_rows(runs["ref"])
    alone = evaluate_target(runs["zero3"], weights="last", batch_size=4, num_workers=0)
    assert alone["num_gallery"] == 15 and alone["num_queries"] == 15
    for key, value in ref_row["metrics"]["t2i"].items():
        assert row["metrics"]["t2i"][key] == pytest.approx(value, abs=1e-4), key
        assert alone["metrics"]["t2i"][key] == pytest.approx(value, abs=1e-4), key


def test_zero3_partitioned_checkpoint_loads_as_the_single_process_model(runs: dict[str, Path]) -> None:
    """Each rank holds a partition of every parameter; zero_to_fp32 puts them together into the weights the
    run exported (exactly) and those of the single-process run."""
    from irra_dist.model.weights import load_model

    loaded = load_model(runs["zero3"] / "checkpoints" / "last")
    assert loaded.kind == "deepspeed_checkpoint"
    got = loaded.model.state_dict()
    exported = load_file(runs["zero3"] / "model.safetensors")
    ref = load_file(runs["ref"] / "model.safetensors")
    assert got.keys() == exported.keys() == ref.keys()
    for key, value in ref.items():
        assert torch.equal(got[key], exported[key]), key
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
