"""``model.init_from``: a training run starts from another model's towers, IRR module and (when the number of
identities matches) its classifier, read from a run folder, a safetensors export or an official best.pth."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from irra_dist.config import load_config
from irra_dist.engine.init_from import build_model_for_training
from irra_dist.model import (
    CheckpointError,
    build_irra,
    export_official_checkpoint,
    load_model,
    save_weights_safetensors,
)

# Heads follow CLIP's width // 64 rule, so the official format (which stores no head count) rebuilds it.
SIZES = dict(embed_dim=64, image_size=(64, 32), patch_size=16, stride_size=16, vision_width=64,
             vision_layers=1, vision_heads=1, text_width=64, text_layers=1, text_heads=1)


def _cfg(tiny_recipe: Path, source: Path | str, *extra: str):
    return load_config(tiny_recipe, [f"model.init_from={source}", *extra])


def _source(num_classes: int, with_mlm: bool = True):
    torch.manual_seed(11)
    return build_irra(num_classes, cmt_depth=1, with_mlm=with_mlm, **SIZES)


@pytest.mark.parametrize("fmt", ["safetensors", "official"])
def test_starts_from_the_source_weights(tiny_recipe: Path, tmp_path: Path, fmt: str) -> None:
    source = _source(num_classes=13)
    file = tmp_path / ("w.safetensors" if fmt == "safetensors" else "best.pth")
    (save_weights_safetensors if fmt == "safetensors" else export_official_checkpoint)(source, file)
    expected = {k: v.clone() for k, v in source.state_dict().items()}

    model = build_model_for_training(_cfg(tiny_recipe, file), num_classes=13)
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_classifier_reinitialised_when_ids_differ_and_irr_fresh_when_absent(tiny_recipe: Path, tmp_path: Path,
                                                                           caplog) -> None:
    source = _source(num_classes=40, with_mlm=False)
    file = tmp_path / "pre.safetensors"
    save_weights_safetensors(source, file)
    with caplog.at_level(logging.INFO):
        model = build_model_for_training(_cfg(tiny_recipe, file), num_classes=13)
    assert model.classifier.weight.shape == (13, 64)
    assert model.with_mlm  # this run's losses (sdm, id, mlm) ask for the IRR module
    towers = {k: v for k, v in source.state_dict().items() if k.startswith("base_model.")}
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in towers.items())
    # Fresh classifier: the official N(0, 0.001) init, so far smaller than a trained one would be.
    assert model.classifier.weight.std().item() == pytest.approx(0.001, rel=0.3)
    assert "ID classifier re-initialised (40 ids in the source, 13 here)" in caplog.text
    assert "IRR module freshly initialised" in caplog.text


def test_from_a_run_folder_and_through_the_trainer(tiny_recipe: Path, fresh_accelerate) -> None:
    from conftest import reset_accelerate

    from irra_dist.engine.trainer import train

    first = train(load_config(tiny_recipe, ["train.run_name=pre"]))
    reset_accelerate()
    # lr tiny: one epoch of fine-tuning barely moves the weights, so they must start equal to the source's.
    second = train(load_config(tiny_recipe, [f"model.init_from={first}", "train.run_name=fine",
                                             "optim.lr=1e-12", "train.seed=5"]))
    before = load_file(first / "model.safetensors")
    after = load_file(second / "model.safetensors")
    for key, value in before.items():
        assert torch.allclose(after[key], value, atol=1e-6), key
    assert "model.init_from: towers and IRR module from" in (second / "train_log.txt").read_text()

    # The trainer's export describes its model: away from config.yaml it rebuilds the recipe's towers, whose
    # 2 heads on width 32 the tensors alone would read as 1 (OpenAI's width // 64).
    alone = tiny_recipe.parent / "alone" / "weights.safetensors"
    alone.parent.mkdir()
    shutil.copy(first / "model.safetensors", alone)
    loaded = load_model(alone)
    assert loaded.source.run_dir is None and "model_config" in loaded.built_from
    sizes = loaded.model.base_model.sizes
    assert (sizes.vision_heads, sizes.text_heads, sizes.image_size, sizes.stride_size) == (2, 2, (64, 32), 16)
    assert loaded.model.num_classes == 13 and loaded.model.with_mlm
    rebuilt = loaded.model.state_dict()
    assert rebuilt.keys() == before.keys() and all(torch.equal(rebuilt[k], v) for k, v in before.items())


def test_source_of_another_image_size_is_refused(tiny_recipe: Path, tmp_path: Path) -> None:
    source = build_irra(0, cmt_depth=1, **{**SIZES, "image_size": (96, 32)})
    file = tmp_path / "other.safetensors"
    save_weights_safetensors(source, file)
    with pytest.raises(CheckpointError, match="image_size"):
        build_model_for_training(_cfg(tiny_recipe, file), num_classes=13)
    with pytest.raises(CheckpointError):
        build_model_for_training(_cfg(tiny_recipe, tmp_path / "missing.safetensors"), num_classes=13)
