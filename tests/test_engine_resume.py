"""Killing a run and resuming it continues the same curve; gradient accumulation; non-finite losses.

Every run here is one process with one thread, so all of them compute bit-identical steps.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, reset_accelerate, subprocess_env
from safetensors.torch import load_file

from irra_dist.config import load_config
from irra_dist.engine.runlog import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate")]

TWO_EPOCHS = ["train.num_epochs=2", "train.checkpoint_every_steps=2", "eval.eval_period=0"]


def _losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (before a kill and after the resume) keeps its last value."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    return {row["step"]: row["loss"] for row in rows if row["kind"] == "train"}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the child processes run one thread too: identical kernels
    yield
    torch.set_num_threads(before)


def test_sigkill_mid_epoch_then_resume_latest_reproduces_the_uninterrupted_run(tiny_recipe: Path) -> None:
    from irra_dist.engine.cli import train_main
    from irra_dist.engine.trainer import train

    runs = tiny_recipe.parent / "runs"
    whole = train(load_config(tiny_recipe, [*TWO_EPOCHS, "train.run_name=whole"]))
    reset_accelerate()

    # The victim: the same recipe in a child process, killed as soon as its first checkpoint (step 2 of 5,
    # mid-epoch) exists. The run takes several more seconds, so the kill lands mid-training.
    cmd = [sys.executable, "launch/train.py", "--config", str(tiny_recipe), *TWO_EPOCHS,
           "train.run_name=victim"]
    child = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    last = runs / "victim" / "checkpoints" / "last"
    deadline = time.monotonic() + 120
    while not last.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and 0 < state["batch_in_epoch"] < 5

    # Without --config, --resume latest finds the run under train.output_dir and uses its config.yaml.
    assert train_main(["--resume", "latest", f"train.output_dir={runs}"]) == 0
    victim = runs / "victim"
    expected, got = _losses(whole), _losses(victim)
    assert sorted(got) == list(range(1, 11))
    assert got == expected  # exactly: same seed, same data, same threads
    final_a, final_b = load_file(whole / "model.safetensors"), load_file(victim / "model.safetensors")
    for key, value in final_a.items():
        assert torch.equal(final_b[key], value), key
    log = (victim / "train_log.txt").read_text()
    assert "resumed from" in log and "training complete" in log


def test_resume_of_a_finished_run_does_nothing(tiny_recipe: Path) -> None:
    from irra_dist.engine.trainer import train

    run = train(load_config(tiny_recipe, ["train.run_name=done", "eval.eval_period=0"]))
    before = (run / "model.safetensors").read_bytes()
    reset_accelerate()
    assert train(load_config(tiny_recipe, ["eval.eval_period=0"]), resume=run) == run
    assert (run / "model.safetensors").read_bytes() == before
    assert len(_losses(run)) == 5


def test_gradient_accumulation_equals_the_large_batch_for_a_per_sample_loss(tiny_recipe: Path) -> None:
    """With the ID loss alone (a mean over samples), 2 micro-batches of 8 accumulated must equal one batch
    of 16, including the epoch's short last group (one micro-batch of one sample)."""
    from irra_dist.engine.trainer import train

    common = ["loss.names=[id]", "data.mlm=false", "eval.eval_period=0"]
    big = train(load_config(tiny_recipe, [*common, "train.run_name=big"]))
    reset_accelerate()
    small = train(load_config(tiny_recipe, [*common, "train.run_name=accum", "train.batch_size=8",
                                            "train.grad_accum_steps=2"]))
    assert sorted(_losses(small)) == [1, 2, 3, 4, 5]
    for step, loss in _losses(big).items():
        assert _losses(small)[step] == pytest.approx(loss, rel=1e-6)
    a, b = load_file(big / "model.safetensors"), load_file(small / "model.safetensors")
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-5, atol=1e-7)


def test_non_finite_losses_skip_steps_then_stop_with_the_last_checkpoint_intact(tiny_recipe: Path,
                                                                               monkeypatch) -> None:
    from irra_dist.engine import trainer as trainer_module

    calls = {"n": 0}
    real_losses = trainer_module.irra_losses

    def poisoned(*args, **kwargs):
        # Steps 3 onwards produce NaN: steps 1-2 train, and the checkpoint after step 2 must survive.
        calls["n"] += 1
        losses = real_losses(*args, **kwargs)
        if calls["n"] >= 3:
            losses["sdm_loss"] = losses["sdm_loss"] * float("nan")
        return losses

    monkeypatch.setattr(trainer_module, "irra_losses", poisoned)
    cfg = load_config(tiny_recipe, [*TWO_EPOCHS, "train.run_name=nan", "train.max_nonfinite_steps=3"])
    with pytest.raises(trainer_module.NonFiniteLossError, match="3 consecutive steps"):
        trainer_module.train(cfg)
    run = tiny_recipe.parent / "runs" / "nan"
    state = json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert sorted(_losses(run)) == [1, 2]  # skipped steps log nothing
    log = (run / "train_log.txt").read_text()
    assert log.count("non-finite loss") == 3
