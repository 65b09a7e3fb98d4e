"""N processes x B trains like 1 process x N*B: DDP and DeepSpeed ZeRO-2 against a single-process run.

One epoch of the tiny recipe (65 samples, global batch 16: 5 steps, the last with ONE sample, so with two
processes rank 1 holds an empty batch) is trained three times: in this process with batch 16 (the
reference), under ``accelerate launch`` with 2 processes x 8 (DDP on gloo), and with 2 x 8 under DeepSpeed
ZeRO-2. Every step's losses and the final weights must agree in fp32. The 2-process run also evaluates at
the end of the epoch; its metrics must equal a single-process evaluation of the weights it exported.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN_IDS, train_reference
from safetensors.torch import load_file

from irra_dist.engine.runlog import read_metrics
from irra_dist.run_config import load_run_config

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate")]

LOSS_KEYS = ("loss", "sdm_loss", "id_loss", "mlm_loss")


def _train_rows(run_dir: Path) -> list[dict]:
    return [row for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == "train"]


def _eval_row(run_dir: Path) -> dict:
    rows = [row for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == "eval"]
    assert len(rows) == 1
    return rows[0]


@pytest.fixture(scope="module")
def runs(make_tiny_recipe, launch, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference run and the two 2-process runs, trained once for the module."""

    tmp = tmp_path_factory.mktemp("dist_runs")
    recipe = make_tiny_recipe(tmp)
    out = {"ref": train_reference(recipe)}
    for name, accelerate_config, extra in (("ddp", "cpu_2proc.yaml", []),
                                           ("zero2", "deepspeed_zero2.yaml", ["--num_processes", "2"])):
        done = launch(accelerate_config, "train.py",
                      ["--config", str(recipe), f"train.run_name={name}", "train.batch_size=8"],
                      launcher_args=extra)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
        out[name] = tmp / "runs" / name
        (tmp / f"{name}.console.txt").write_text(done.stdout + done.stderr)  # what a user reads
    return out


def test_console_of_a_launched_run_holds_only_lines_worth_reading(runs: dict[str, Path]) -> None:
    ddp = (runs["ddp"].parent.parent / "ddp.console.txt").read_text()
    zero2 = (runs["zero2"].parent.parent / "zero2.console.txt").read_text()
    for console in (ddp, zero2):
        assert "Warning" not in console, console[-3000:]  # e.g. Accelerate's broadcast_buffers deprecation
        assert "Traceback" not in console
        # a three-line summary of the recipe, not the 60-line config (it is in config.yaml and W&B)
        assert "full config: " in console and "vision_layers:" not in console
    # DeepSpeed is not imported by a run that does not use it
    assert "Setting accelerator to CPU" not in ddp


@pytest.mark.parametrize("name", ["ddp", "zero2"])
def test_two_processes_give_the_single_process_losses(runs: dict[str, Path], name: str) -> None:
    ref, other = _train_rows(runs["ref"]), _train_rows(runs[name])
    assert [r["step"] for r in ref] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in other] == [1, 2, 3, 4, 5]
    for a, b in zip(ref, other):
        for key in LOSS_KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-5), (name, a["step"], key)
    # The last step saw one sample: its SDM is (near) zero, unlike the full steps.
    assert ref[-1]["sdm_loss"] < 0.5 * ref[0]["sdm_loss"]


@pytest.fixture(scope="module")
def initial_weights(runs: dict[str, Path]) -> dict[str, torch.Tensor]:
    """The weights every run started from, rebuilt as the trainer builds them (its seed, then the model)."""
    from accelerate.utils import set_seed

    from irra_dist.engine.init_from import build_model_for_training

    cfg = load_run_config(runs["ref"])
    set_seed(cfg.train.seed)
    return build_model_for_training(cfg, TINY_TRAIN_IDS).state_dict()


def test_the_reference_run_moved_every_weight_by_a_few_adam_steps(
        runs: dict[str, Path], initial_weights: dict[str, torch.Tensor]) -> None:
    """What makes the weight comparison below mean something: every tensor left its initial value by far more
    than the comparison's tolerance, and by no more than Adam's steps can carry it (about one learning rate
    per step and element), which also shows that `initial_weights` are the run's true starting point."""
    ref = load_file(runs["ref"] / "model.safetensors")
    assert ref.keys() == initial_weights.keys()
    optim = load_run_config(runs["ref"]).optim
    largest_lr = optim.lr * optim.lr_factor * optim.bias_lr_factor  # new modules' biases
    steps = len(_train_rows(runs["ref"]))
    for key, value in ref.items():
        moved = float((value - initial_weights[key]).abs().max())
        # measured: 3.5e-4 (visual ln_2.weight) to 2.4e-3 (mlm_head.ln.bias); 5 steps x 1e-3 = 5e-3
        assert 1e-5 < moved <= steps * largest_lr, (key, moved)


@pytest.mark.parametrize("name", ["ddp", "zero2"])
def test_two_processes_give_the_single_process_weights(runs: dict[str, Path], name: str) -> None:
    ref = load_file(runs["ref"] / "model.safetensors")
    other = load_file(runs[name] / "model.safetensors")
    assert ref.keys() == other.keys()
    for key, value in ref.items():
        torch.testing.assert_close(other[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_zero2_checkpoint_loads_as_the_ddp_checkpoint(runs: dict[str, Path]) -> None:
    """DeepSpeed's own checkpoint files (each rank's fp32 partition, consolidated by zero_to_fp32) give the
    model of the DDP run's checkpoint, and exactly the weights the ZeRO-2 run exported."""
    from irra_dist.model.weights import load_model

    zero2 = load_model(runs["zero2"] / "checkpoints" / "last")
    ddp = load_model(runs["ddp"] / "checkpoints" / "last")
    assert (zero2.kind, ddp.kind) == ("deepspeed_checkpoint", "accelerate_checkpoint")
    got, want = zero2.model.state_dict(), ddp.model.state_dict()
    exported = load_file(runs["zero2"] / "model.safetensors")
    assert got.keys() == want.keys() == exported.keys()
    for key, value in want.items():
        assert torch.equal(got[key], exported[key]), key
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_two_process_evaluation_equals_single_process_evaluation(runs: dict[str, Path]) -> None:
    from irra_dist.engine.evaluate import evaluate_target

    during_training = _eval_row(runs["ddp"])["metrics"]
    alone = evaluate_target(runs["ddp"], weights="last", batch_size=7, num_workers=0)
    assert alone["num_gallery"] == 20 and alone["num_queries"] == 20
    assert alone["metrics"].keys() == during_training.keys()
    for key, value in during_training["t2i"].items():
        assert alone["metrics"]["t2i"][key] == pytest.approx(value, abs=1e-4), key
    # And the reference run's own evaluation saw the same model, hence the same ranking.
    assert _eval_row(runs["ref"])["metrics"]["t2i"] == pytest.approx(during_training["t2i"], abs=1e-4)


def test_deepspeed_run_stopped_mid_epoch_resumes_to_the_same_result(runs: dict[str, Path], launch) -> None:
    """ZeRO-2 checkpoints (DeepSpeed's own files, written by every rank) resume to the uninterrupted run."""
    recipe = runs["zero2"].parent.parent / "tiny.yaml"
    args = ["--config", str(recipe), "train.run_name=zero2_resumed", "train.batch_size=8"]
    ds = ["--num_processes", "2"]
    done = launch("deepspeed_zero2.yaml", "train.py", [*args, "train.max_steps=3"], launcher_args=ds)
    assert done.returncode == 0, done.stderr[-5000:]
    part = runs["zero2"].parent / "zero2_resumed"
    assert [r["step"] for r in _train_rows(part)] == [1, 2, 3]
    done = launch("deepspeed_zero2.yaml", "train.py", ["--resume", str(part), "train.max_steps=0"],
                  launcher_args=ds)
    assert done.returncode == 0, done.stderr[-5000:]
    resumed_rows, whole_rows = _train_rows(part), _train_rows(runs["zero2"])
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4, 5]
    for a, b in zip(resumed_rows, whole_rows):
        assert [a[k] for k in LOSS_KEYS] == [b[k] for k in LOSS_KEYS], a["step"]  # bit-identical
    whole, resumed = load_file(runs["zero2"] / "model.safetensors"), load_file(part / "model.safetensors")
    for key, value in whole.items():
        assert torch.equal(resumed[key], value), key
