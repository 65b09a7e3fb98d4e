"""Mixed precision, honestly: bf16 autocast trains the demo model on the CPU close to fp32, and exported
weights are fp32 whatever the training precision (DeepSpeed bf16 is checked by the acceptance dry run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO, reset_accelerate
from safetensors.torch import load_file

from irra_dist.config import load_config
from irra_dist.engine.runlog import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate")]


def test_bf16_autocast_trains_the_demo_model_close_to_fp32(tiny_shards: Path, tmp_path: Path) -> None:
    from irra_dist.engine.trainer import train

    def run(precision: str) -> Path:
        reset_accelerate()
        cfg = load_config(REPO / "configs" / "demo.yaml", [
            f"data.shards={tiny_shards}", "data.num_workers=0", "data.build_demo_if_missing=false",
            f"train.output_dir={tmp_path}", f"train.run_name=run_{precision}",
            f"train.mixed_precision='{precision}'", "train.batch_size=8", "train.max_steps=2",
            "train.log_period=1", "logging.wandb=false"])
        return train(cfg)

    fp32, bf16 = run("no"), run("bf16")
    assert "mixed precision bf16" in (bf16 / "train_log.txt").read_text()
    rows = {name: [r for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "train"]
            for name, d in (("fp32", fp32), ("bf16", bf16))}
    assert [r["step"] for r in rows["bf16"]] == [1, 2]
    for a, b in zip(rows["fp32"], rows["bf16"]):
        for key in ("loss", "sdm_loss", "id_loss", "mlm_loss"):
            assert torch.isfinite(torch.tensor(b[key])), (b["step"], key)
            # bf16 keeps 8 bits of mantissa: about 0.4 % per rounding, a few percent after a few steps.
            assert b[key] == pytest.approx(a[key], rel=3e-2), (b["step"], key)
        assert b["loss"] != a["loss"]  # autocast really ran in bf16
    weights = load_file(bf16 / "model.safetensors")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
