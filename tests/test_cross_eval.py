"""Cross-dataset evaluation: one model, the test split of several shard sets, one table and one JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import direct_metrics, small_irra

from irra_dist.engine.cli import evaluate_main


def test_one_row_per_shard_set(tiny_shards: Path, tmp_path: Path, capsys, fresh_accelerate) -> None:
    from irra_dist.data.shards import build_shards
    from irra_dist.model import save_weights_safetensors
    from irra_dist.synthetic.dataset import generate_synthetic_dataset

    # A second population: other people, other captions, another gallery size.
    generate_synthetic_dataset(tmp_path / "other" / "CUHK-PEDES", num_train_ids=3, num_val_ids=1,
                               num_test_ids=6, images_per_id=(3, 3), captions_per_image=2, seed=99)
    other = tmp_path / "other_shards"
    build_shards("CUHK-PEDES", tmp_path / "other", other, shard_size=8, workers=1)

    torch.manual_seed(0)
    model = small_irra()
    weights = tmp_path / "model.safetensors"
    save_weights_safetensors(model, weights)
    out = tmp_path / "cross.json"
    assert evaluate_main([str(weights), "--shards", str(tiny_shards), str(other), "--num-workers", "0",
                          "--batch-size", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "20 queries, 20 images" in printed and "36 queries, 18 images" in printed
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "shards"
    assert [row.split("|")[1].strip() for row in table[1:]] == [tiny_shards.name, other.name]
    results = json.loads(out.read_text())
    assert [r["shards"] for r in results] == [str(tiny_shards), str(other)]
    assert [r["num_gallery"] for r in results] == [20, 18]
    for result, shards in zip(results, (tiny_shards, other)):
        assert result["metrics"]["t2i"] == pytest.approx(direct_metrics(model, shards), abs=1e-4)
