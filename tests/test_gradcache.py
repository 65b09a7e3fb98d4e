"""Gradient-cached chunks (``train.chunk_size``) give the step of the whole batch.

The reference is the plain step: one epoch of the tiny recipe (65 samples, global batch 16: 5 steps, the
last with ONE sample, so with 2 processes rank 1 holds an empty batch and, with chunks of 2, rank 0 one
chunk of one row) trained in this process with batch 16 unchunked. Against it: batch 16 in chunks of 4 in
this process, and 2 processes x 8 in chunks of 2 under DDP and under DeepSpeed ZeRO-2. Losses at every step
and the final weights must agree in fp32. bf16 autocast on the CPU is compared over three steps, within
what bf16 rounding allows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN_IDS, reset_accelerate
from safetensors.torch import load_file

from irra_dist.config import ConfigError, load_config
from irra_dist.engine.gradcache import check_chunking, split_batch
from irra_dist.engine.runlog import LOG_FILE, read_metrics

LOSS_KEYS = ("loss", "sdm_loss", "id_loss", "mlm_loss")
CHUNKED_LINE = "gradient-cached chunks"


def _train_rows(run_dir: Path) -> list[dict]:
    return [row for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == "train"]


def _train_here(recipe: Path, overrides: list[str]) -> Path:
    """Train in this process, one thread (as each launched process), with fresh Accelerate state."""
    from irra_dist.engine.trainer import train

    reset_accelerate()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config(recipe, ["eval.eval_period=0", *overrides]))
    finally:
        torch.set_num_threads(before)
        reset_accelerate()


def _assert_same_losses(ref: Path, other: Path, rel: float) -> None:
    ref_rows, other_rows = _train_rows(ref), _train_rows(other)
    assert [r["step"] for r in other_rows] == [r["step"] for r in ref_rows]
    for a, b in zip(ref_rows, other_rows):
        for key in LOSS_KEYS:
            assert b[key] == pytest.approx(a[key], rel=rel), (other.name, a["step"], key)


def _assert_same_weights(ref: Path, other: Path) -> None:
    expected, got = load_file(ref / "model.safetensors"), load_file(other / "model.safetensors")
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture(scope="module")
def recipe(make_tiny_recipe, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_recipe(tmp_path_factory.mktemp("gradcache"))


@pytest.fixture(scope="module")
def reference(recipe: Path) -> Path:
    """1 process x 16, unchunked, one epoch."""
    return _train_here(recipe, ["train.run_name=ref"])


# --------------------------------------------------------------------------------------------------
# Units


def test_split_batch_cuts_rows_and_keeps_an_empty_batch_as_one_chunk() -> None:
    batch = {"pids": torch.arange(10), "images": torch.randn(10, 3, 2, 2), "scalar": torch.tensor(3.0)}
    chunks = split_batch(batch, 4)
    assert [c["pids"].tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert torch.equal(torch.cat([c["images"] for c in chunks]), batch["images"])
    assert all(c["scalar"] is batch["scalar"] for c in chunks)
    empty = split_batch({"pids": torch.zeros(0, dtype=torch.long), "images": torch.zeros(0, 3, 2, 2)}, 4)
    assert len(empty) == 1 and empty[0]["images"].shape == (0, 3, 2, 2)


def test_deepspeed_without_managed_accumulation_is_refused(recipe: Path) -> None:
    cfg = load_config(recipe, ["train.chunk_size=4"])
    check_chunking(cfg, {"zero_optimization": {"stage": 2}})  # composes
    with pytest.raises(ConfigError, match="train.chunk_size.*managed_gradient_accumulation"):
        check_chunking(cfg, {"managed_gradient_accumulation": False})
    check_chunking(load_config(recipe), {"managed_gradient_accumulation": False})  # chunks off: no concern


class _DropoutTowers(torch.nn.Module):
    """Two linear towers with dropout: the random draws that the second pass must replay."""

    def __init__(self) -> None:
        super().__init__()
        self.image, self.text = torch.nn.Linear(4, 8), torch.nn.Linear(4, 8)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, batch: dict) -> dict:
        return {"image_feats": self.drop(self.image(batch["images"])),
                "text_feats": self.drop(self.text(batch["texts"]))}


@pytest.mark.usefixtures("fresh_accelerate")
def test_second_pass_replays_the_first_pass_dropout_and_the_stream_continues() -> None:
    from accelerate import Accelerator

    from irra_dist.config import config_from_dict
    from irra_dist.engine.gradcache import GradientCache
    from irra_dist.losses import irra_losses

    torch.manual_seed(0)
    model = _DropoutTowers()
    batch = {"images": torch.randn(6, 4), "texts": torch.randn(6, 4), "pids": torch.arange(6) // 2}
    cfg = config_from_dict({"train": {"batch_size": 6, "chunk_size": 2},
                            "loss": {"names": ["sdm"], "global_batch": False}})
    # Reference: the chunks' forwards in order from seed 1, with a graph, and the loss on their features.
    torch.manual_seed(1)
    outs = [model(c) for c in split_batch(batch, 2)]
    after = torch.get_rng_state()
    feats = {k: torch.cat([o[k] for o in outs]) for k in ("image_feats", "text_feats")}
    losses = irra_losses(feats, batch, ["sdm"], cfg.model.temperature, {"sdm": 1.0},
                         normalizers={"batch": 6.0, "mlm": 1.0})
    expected = torch.autograd.grad(losses["sdm_loss"], list(model.parameters()))
    cache = GradientCache(Accelerator(cpu=True), model, cfg)
    torch.manual_seed(1)
    cache.backward(cache.forward(batch, [6], None, 0))
    assert torch.equal(torch.get_rng_state(), after)
    for param, grad in zip(model.parameters(), expected):
        torch.testing.assert_close(param.grad, grad)


# --------------------------------------------------------------------------------------------------
# Whole runs against the unchunked reference


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate")
def test_one_process_chunks_of_4_equal_batch_16(recipe: Path, reference: Path) -> None:
    chunked = _train_here(recipe, ["train.run_name=chunks4", "train.chunk_size=4"])
    assert CHUNKED_LINE in (chunked / LOG_FILE).read_text()
    assert CHUNKED_LINE not in (reference / LOG_FILE).read_text()
    assert [r["step"] for r in _train_rows(chunked)] == [1, 2, 3, 4, 5]
    _assert_same_losses(reference, chunked, rel=1e-5)
    _assert_same_weights(reference, chunked)
    # The last step saw one sample: its SDM is (near) zero, unlike the full steps.
    rows = _train_rows(chunked)
    assert rows[-1]["sdm_loss"] < 0.5 * rows[0]["sdm_loss"]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate")
@pytest.mark.parametrize(("name", "accelerate_config", "launcher_args"),
                         [("ddp", "cpu_2proc.yaml", []),
                          ("zero2", "deepspeed_zero2.yaml", ["--num_processes", "2"])])
def test_two_processes_chunks_of_2_equal_one_process_batch_16(recipe: Path, reference: Path, launch,
                                                               name: str, accelerate_config: str,
                                                               launcher_args: list[str]) -> None:
    done = launch(accelerate_config, "train.py",
                  ["--config", str(recipe), f"train.run_name={name}", "train.batch_size=8",
                   "train.chunk_size=2", "eval.eval_period=0"], launcher_args=launcher_args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    run = recipe.parent / "runs" / name
    assert CHUNKED_LINE in (run / LOG_FILE).read_text()
    _assert_same_losses(reference, run, rel=1e-5)
    _assert_same_weights(reference, run)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate")
def test_bf16_chunks_agree_with_unchunked_within_bf16_rounding(recipe: Path) -> None:
    from accelerate.utils import set_seed

    from irra_dist.model import build_irra_from_config

    bf16 = ["train.mixed_precision=bf16", "train.max_steps=3"]
    plain = _train_here(recipe, ["train.run_name=bf16", *bf16])
    chunked = _train_here(recipe, ["train.run_name=bf16_chunks4", "train.chunk_size=4", *bf16])
    assert CHUNKED_LINE in (chunked / LOG_FILE).read_text()
    # bf16 keeps ~3 significant digits; the losses here differ by ~2e-3 relative between the two runs.
    _assert_same_losses(plain, chunked, rel=1e-2)
    # Weights: the two runs' distance is a small part of the distance travelled from the initial weights
    # (measured 1.2%; running SDM at half weight instead gives 6%).
    cfg = load_config(recipe)
    set_seed(cfg.train.seed)
    initial = build_irra_from_config(cfg.model, TINY_TRAIN_IDS).state_dict()
    a, b = load_file(plain / "model.safetensors"), load_file(chunked / "model.safetensors")
    assert a.keys() == initial.keys()
    travelled = sum(((a[k] - initial[k]) ** 2).sum() for k in a) ** 0.5
    apart = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    assert travelled > 0
    assert apart < 0.04 * travelled, (float(apart), float(travelled))
