"""Official IRRA best.pth loading/export and safetensors weights, on tiny checkpoints written here."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from irra_dist.model import (
    CheckpointError,
    build_irra,
    export_official_checkpoint,
    load_irra_weights,
    load_official_irra_checkpoint,
    save_weights_safetensors,
)

VOCAB, LENGTH = 60, 16
SIZES = dict(embed_dim=64, image_size=(64, 32), patch_size=16, stride_size=16, vision_width=128,
             vision_layers=2, vision_heads=2, context_length=LENGTH, vocab_size=VOCAB, text_width=64,
             text_heads=1, text_layers=2)
NUM_CLASSES, CMT_DEPTH = 9, 3
# IRRA_SPEC 1.7: convert_weights makes Linear/Conv/MHA weights and biases and the two projections fp16.
HALF_MARKERS = ("conv1", "in_proj", "out_proj", "c_fc", "c_proj", "classifier", "mlm_head.dense",
                "mlm_head.fc")


def is_official_half(key: str) -> bool:
    return any(m in key for m in HALF_MARKERS) or key.endswith(("text_projection", "visual.proj"))


def official_keys(vision_layers: int, text_layers: int, cmt_depth: int, with_irr: bool) -> set[str]:
    """The official state-dict key names, written out from IRRA_SPEC 4.4."""
    block = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
             "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
             "mlp.c_proj.bias", "ln_2.weight", "ln_2.bias"]
    keys = {f"base_model.visual.{k}" for k in ("conv1.weight", "class_embedding", "positional_embedding",
                                               "ln_pre.weight", "ln_pre.bias", "ln_post.weight",
                                               "ln_post.bias", "proj")}
    keys |= {f"base_model.visual.transformer.resblocks.{i}.{k}" for i in range(vision_layers) for k in block}
    keys |= {f"base_model.transformer.resblocks.{i}.{k}" for i in range(text_layers) for k in block}
    keys |= {"base_model.token_embedding.weight", "base_model.positional_embedding",
             "base_model.ln_final.weight", "base_model.ln_final.bias", "base_model.text_projection",
             "classifier.weight", "classifier.bias"}
    if with_irr:
        keys |= {f"cross_attn.{k}" for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                             "out_proj.bias")}
        keys |= {f"cross_modal_transformer.resblocks.{i}.{k}" for i in range(cmt_depth) for k in block}
        keys |= {f"{ln}.{p}" for ln in ("ln_pre_t", "ln_pre_i", "ln_post") for p in ("weight", "bias")}
        keys |= {f"mlm_head.{m}.{p}" for m in ("dense", "ln", "fc") for p in ("weight", "bias")}
    return keys


def official_checkpoint(path: Path, with_irr: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a best.pth as the official Checkpointer does under DDP; return its (prefixed) model dict."""
    torch.manual_seed(seed)
    model = build_irra(NUM_CLASSES, cmt_depth=CMT_DEPTH, with_mlm=with_irr, **SIZES)
    sd = {f"module.{k}": (v.half() if is_official_half(k) else v) for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, eps=1e-3)
    scheduler = {"base_lrs": [1e-5], "last_epoch": 3, "mode": "cosine", "milestones": (20, 50),
                 "warmup_method": "linear", "_last_lr": [4.6e-6]}
    torch.save({"model": sd, "optimizer": optimizer.state_dict(), "scheduler": scheduler, "num_epoch": 60,
                "iteration": 0, "epoch": 4}, path)
    return sd


def test_official_checkpoint_loads_strictly_in_fp32(tmp_path: Path):
    path = tmp_path / "best.pth"
    source = official_checkpoint(path)
    model = load_official_irra_checkpoint(path, image_size=(64, 32))
    own = model.state_dict()
    assert set(own) == official_keys(2, 2, CMT_DEPTH, with_irr=True)
    assert sum(v.dtype == torch.float16 for v in source.values()) > 0
    for key, value in own.items():
        assert value.dtype == torch.float32, key
        torch.testing.assert_close(value, source[f"module.{key}"].float(), rtol=0, atol=0, msg=key)
    assert model.num_classes == NUM_CLASSES and len(model.cross_modal_transformer.resblocks) == CMT_DEPTH
    assert model.with_mlm and model.logit_scale.item() == pytest.approx(50.0)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))

    images = torch.randn(2, 3, 64, 32)
    text = torch.randint(1, VOCAB - 4, (2, LENGTH))
    text[:, 6] = VOCAB - 1
    with torch.no_grad():
        assert model.encode_image(images).shape == model.encode_text(text).shape == (2, 64)


def test_checkpoint_without_irr_module_and_bare_state_dict(tmp_path: Path):
    sd = official_checkpoint(tmp_path / "best.pth", with_irr=False)
    bare = tmp_path / "bare.pth"
    torch.save({k.removeprefix("module."): v for k, v in sd.items()}, bare)
    for path in (tmp_path / "best.pth", bare):
        model = load_official_irra_checkpoint(path, image_size=(64, 32))
        assert not model.with_mlm
        assert set(model.state_dict()) == official_keys(2, 2, 0, with_irr=False)


def test_export_round_trip(tmp_path: Path):
    official_checkpoint(tmp_path / "best.pth")
    model = load_official_irra_checkpoint(tmp_path / "best.pth", image_size=(64, 32))
    out = tmp_path / "export" / "irra.pth"
    export_official_checkpoint(model, out)
    assert [p.name for p in out.parent.iterdir()] == ["irra.pth"]  # no temporary file left behind
    saved = torch.load(out, weights_only=True)
    # "model" is all the official loader reads; "irra_dist" holds the facts the tensors cannot carry
    assert set(saved) == {"model", "irra_dist"}
    assert set(saved["model"]) == official_keys(2, 2, CMT_DEPTH, with_irr=True)
    reloaded = load_official_irra_checkpoint(out, image_size=(64, 32))
    expected = model.state_dict()
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
        torch.testing.assert_close(saved["model"][key], expected[key], rtol=0, atol=0)

    export_official_checkpoint(model, out)  # overwriting an existing export also works
    assert sorted(p.name for p in out.parent.iterdir()) == ["irra.pth"]


def test_safetensors_round_trip_is_self_describing(tmp_path: Path):
    torch.manual_seed(0)
    model = build_irra(NUM_CLASSES, cmt_depth=1, temperature=0.05, **SIZES)
    path = tmp_path / "weights.safetensors"
    save_weights_safetensors(model, path, metadata={"run": "test"})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["run"] == "test"
        assert set(f.keys()) == official_keys(2, 2, 1, with_irr=True)
    reloaded = load_irra_weights(path)  # image size, stride and temperature come from the metadata
    assert reloaded.base_model.visual.image_size == (64, 32)
    assert reloaded.logit_scale.item() == pytest.approx(20.0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)


def _one_line_naming(err: pytest.ExceptionInfo, path: Path) -> bool:
    return "\n" not in str(err.value) and str(path) in str(err.value)


def test_bad_checkpoints_give_one_clear_error(tmp_path: Path):
    missing = tmp_path / "missing.pth"
    with pytest.raises(CheckpointError, match="not found") as err:
        load_official_irra_checkpoint(missing)
    assert _one_line_naming(err, missing)

    good = tmp_path / "best.pth"
    official_checkpoint(good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_official_irra_checkpoint(truncated, image_size=(64, 32))
    assert _one_line_naming(err, truncated)

    not_irra = tmp_path / "not_irra.pth"
    torch.save({"model": {"encoder.weight": torch.randn(8, 3)}}, not_irra)
    with pytest.raises(CheckpointError, match="neither an IRRA nor a CLIP state dict") as err:
        load_official_irra_checkpoint(not_irra)
    assert _one_line_naming(err, not_irra)

    partial_clip = tmp_path / "clip_part.pth"  # CLIP files load (zero-shot CLIP); a fragment of one does not
    torch.save({"model": {"visual.conv1.weight": torch.randn(8, 3, 16, 16)}}, partial_clip)
    with pytest.raises(CheckpointError, match="not a ViT CLIP checkpoint") as err:
        load_official_irra_checkpoint(partial_clip)
    assert _one_line_naming(err, partial_clip)

    pickled = tmp_path / "with_args.pth"
    torch.save({"model": {"base_model.x": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-5)}, pickled)
    with pytest.raises(CheckpointError, match=r"argparse\.Namespace") as err:
        load_official_irra_checkpoint(pickled)
    assert _one_line_naming(err, pickled)

    with pytest.raises(CheckpointError, match="image_size") as err:
        load_official_irra_checkpoint(good, image_size=(384, 128))
    assert _one_line_naming(err, good)

    broken = tmp_path / "broken_safetensors.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="safetensors") as err:
        load_irra_weights(broken)
    assert _one_line_naming(err, broken)


def test_safetensors_keeps_head_counts_that_break_the_width_rule(tmp_path: Path):
    # width 128 with 4 heads: OpenAI's width // 64 rule would rebuild it with 2 heads and wrong outputs.
    torch.manual_seed(0)
    sizes = {**SIZES, "embed_dim": 128, "vision_width": 128, "vision_heads": 4, "text_width": 128,
             "text_heads": 4}
    model = build_irra(NUM_CLASSES, cmt_depth=1, **sizes).eval()
    path = tmp_path / "weights.safetensors"
    save_weights_safetensors(model, path)
    reloaded = load_irra_weights(path).eval()
    assert (reloaded.base_model.sizes.vision_heads, reloaded.base_model.sizes.text_heads) == (4, 4)
    images = torch.randn(2, 3, 64, 32)
    ids = torch.zeros(2, LENGTH, dtype=torch.long)
    ids[:, 0], ids[:, 1], ids[:, 2] = VOCAB - 2, 3, VOCAB - 1  # start, a word, end (the argmax)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(images), model.encode_image(images))
        torch.testing.assert_close(reloaded.encode_text(ids), model.encode_text(ids))
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # normal permissions, not mkstemp's
