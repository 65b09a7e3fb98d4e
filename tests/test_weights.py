"""One weights module: every format irra_dist reads becomes the model that was saved (same outputs, bit for
bit), found by content, with the architecture taken from the file itself; bad input is one line naming the
file.

DeepSpeed checkpoints (ZeRO-2 and ZeRO-3 partitions) are checked on the runs of test_engine_distributed.py and
test_engine_zero3.py, which already launch them.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_clip import save_torchscript

from irra_dist.config import config_from_dict, save_config
from irra_dist.model import (
    IRRA,
    CheckpointError,
    build_clip,
    build_irra,
    export_official_checkpoint,
    find_weights,
    load_model,
    save_weights_safetensors,
)
from irra_dist.model.weights import MODEL_CONFIG_KEY, Architecture

VOCAB, LENGTH = 60, 16
# 4 heads on width 64: the tensors alone (OpenAI's width // 64 rule) would rebuild 1 head and other outputs.
SIZES = dict(embed_dim=32, image_size=(64, 32), patch_size=16, stride_size=16, vision_width=64,
             vision_layers=2, vision_heads=4, context_length=LENGTH, vocab_size=VOCAB, text_width=64,
             text_heads=4, text_layers=1)
# CLIP-shaped: heads = width // 64, so an official best.pth (which records no head count) describes it.
CLIP_SIZES = {**SIZES, "vision_heads": 1, "text_heads": 1}


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)


def _model(seed: int = 0, *, num_classes: int = 7, with_mlm: bool = True, **sizes) -> IRRA:
    torch.manual_seed(seed)
    return build_irra(num_classes, cmt_depth=2, temperature=0.04, with_mlm=with_mlm,
                      mlm_logits_at_masked_only=False, **{**SIZES, **sizes}).eval()


def _batch(model: IRRA) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    height, width = model.base_model.visual.image_size
    ids = torch.randint(1, VOCAB - 3, (3, LENGTH), generator=gen)
    ids[:, 0], ids[:, 9:] = VOCAB - 2, 0
    ids[:, 8] = VOCAB - 1  # the end token: the largest id of each row
    labels = torch.zeros_like(ids)
    labels[:, 2:5] = ids[:, 2:5]
    mlm_ids = ids.clone()
    mlm_ids[:, 2:5] = VOCAB - 3
    return {"images": torch.randn(3, 3, height, width, generator=gen), "caption_ids": ids, "mlm_ids": mlm_ids,
            "mlm_labels": labels}


def assert_same_model(got: IRRA, want: IRRA) -> None:
    """Same architecture and the same outputs, exactly: global features and every output of a forward."""
    assert Architecture.of(got) == Architecture.of(want)
    got.eval()
    want.eval()
    batch = _batch(want)
    with torch.no_grad():
        assert torch.equal(got.encode_image(batch["images"]), want.encode_image(batch["images"]))
        assert torch.equal(got.encode_text(batch["caption_ids"]), want.encode_text(batch["caption_ids"]))
        out_got, out_want = got(batch), want(batch)
    assert out_got.keys() == out_want.keys()
    for key, value in out_want.items():
        assert torch.equal(out_got[key], value), key


def _one_line(err: pytest.ExceptionInfo, path: Path) -> str:
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    return message


# --------------------------------------------------------------------------------------------------
# Exports carry their architecture


def test_safetensors_export_rebuilds_its_exact_architecture_alone(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "model.safetensors"
    save_weights_safetensors(model, path, {"config": "provenance only"})
    assert not (tmp_path / "config.yaml").exists()
    with safe_open(str(path), framework="pt") as f:
        stored = json.loads(f.metadata()[MODEL_CONFIG_KEY])
    # the model config's own field names, plus what the IRRA constructor needs
    assert stored == {"version": 1, **{k: list(v) if k == "image_size" else v for k, v in SIZES.items()},
                      "num_classes": 7, "cmt_depth": 2, "with_mlm": True, "temperature": 0.04,
                      "mlm_logits_at_masked_only": False}
    loaded = load_model(path)
    assert loaded.kind == "irra_dist" and loaded.source.run_dir is None
    assert "model_config" in loaded.built_from
    assert_same_model(loaded.model, model)
    # exports written while the model had a mask_global_text switch (now data.mask_global_text) still load
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    meta[MODEL_CONFIG_KEY] = json.dumps({**stored, "mask_global_text": True})
    save_file(tensors, str(tmp_path / "older.safetensors"), metadata=meta)
    assert_same_model(load_model(tmp_path / "older.safetensors").model, model)
    # without the IRR module and the classifier too
    bare = _model(3, num_classes=0, with_mlm=False)
    save_weights_safetensors(bare, path)
    assert_same_model(load_model(path).model, bare)


def test_format_is_read_from_the_content_not_the_name(tmp_path: Path) -> None:
    model = _model(1)
    safetensors_named_pth = tmp_path / "weights.pth"
    save_weights_safetensors(model, safetensors_named_pth)
    assert_same_model(load_model(safetensors_named_pth).model, model)
    torch_named_safetensors = tmp_path / "weights.safetensors"
    export_official_checkpoint(model, torch_named_safetensors)
    assert_same_model(load_model(torch_named_safetensors).model, model)


def test_official_best_pth_in_fp16_equals_the_model_with_rounded_weights(tmp_path: Path) -> None:
    model = _model(2, **CLIP_SIZES)
    # As the official Checkpointer under DDP: module. prefix; Linear/Conv/MHA/projections fp16 (IRRA_SPEC 1.7)
    half = ("conv1", "in_proj", "out_proj", "c_fc", "c_proj", "classifier", "mlm_head.dense", "mlm_head.fc")
    state = {k: v.half() if any(m in k for m in half) or k.endswith(("text_projection", "visual.proj")) else v
             for k, v in model.state_dict().items()}
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "best.pth")
    reference = _model(2, **CLIP_SIZES)
    reference.load_state_dict({k: v.float() for k, v in state.items()})
    reference.temperature, reference.logit_scale = 0.02, torch.tensor(50.0)  # the official file's default

    loaded = load_model(tmp_path / "best.pth", image_size=(64, 32))
    assert loaded.kind == "official" and "width // 64" in loaded.built_from
    loaded.model.mlm_logits_at_masked_only = False  # how the MLM head runs in training; not in the file
    assert_same_model(loaded.model, reference)


def test_exported_best_pth_keeps_what_the_official_format_cannot_say(tmp_path: Path) -> None:
    model = _model(4)  # 4 heads on width 64, temperature 0.04, 7 classes
    export_official_checkpoint(model, tmp_path / "best.pth")
    saved = torch.load(tmp_path / "best.pth", weights_only=True)
    assert set(saved) == {"model", "irra_dist"} and MODEL_CONFIG_KEY in saved["irra_dist"]
    loaded = load_model(tmp_path / "best.pth")
    assert loaded.kind == "irra_dist"
    assert_same_model(loaded.model, model)


@pytest.mark.parametrize("container", ["torchscript", "state_dict"])
def test_openai_clip_file_gives_clip_features(tmp_path: Path, container: str) -> None:
    torch.manual_seed(5)
    clip = build_clip(**CLIP_SIZES).eval()
    state = {**clip.state_dict(), "logit_scale": torch.tensor(4.6), "input_resolution": torch.tensor(64)}
    path = tmp_path / "ViT-tiny.pt"
    save_torchscript(state, path) if container == "torchscript" else torch.save(state, path)
    loaded = load_model(path, image_size=(64, 32))
    assert loaded.kind == "openai_clip"
    model = loaded.model.eval()
    assert model.num_classes == 0 and not model.with_mlm
    batch = _batch(model)
    with torch.no_grad():
        assert torch.equal(model.encode_image(batch["images"]),
                           clip.encode_image(batch["images"], all_tokens=False))
        assert torch.equal(model.encode_text(batch["caption_ids"]),
                           clip.encode_text(batch["caption_ids"], all_tokens=False))


# --------------------------------------------------------------------------------------------------
# Older exports, run folders and training checkpoints


def _run_config(run: Path, **model) -> None:
    sizes = {k: list(v) if k == "image_size" else v for k, v in SIZES.items()}
    save_config(config_from_dict({"model": {"pretrained": "none", "cmt_depth": 2, "temperature": 0.04,
                                            "mlm_logits_at_masked_only": False, **sizes, **model}}),
                run / "config.yaml")


def test_old_exports_fall_back_to_their_sizes_or_the_run_config(tmp_path: Path) -> None:
    model = _model(6)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    # written before model_config: the image size, stride, temperature and head counts only
    facts = tmp_path / "facts.safetensors"
    save_file(tensors, str(facts), metadata={"format": "irra_dist.irra", "image_size": "64,32",
                                             "stride_size": "16", "temperature": "0.04",
                                             "vision_heads": "4", "text_heads": "4"})
    loaded = load_model(facts).model
    loaded.mlm_logits_at_masked_only = False
    assert_same_model(loaded, model)

    run = tmp_path / "run"
    run.mkdir()
    bare = run / "model.safetensors"
    save_file(tensors, str(bare))  # nothing but the tensors
    with pytest.raises(CheckpointError, match="config.yaml") as err:
        load_model(bare)
    _one_line(err, bare)
    _run_config(run)
    loaded = load_model(run)
    assert str(run / "config.yaml") in loaded.built_from
    assert_same_model(loaded.model, model)


def test_run_folder_picks_best_or_last(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _run_config(run)
    last, best = _model(7), _model(8)
    save_weights_safetensors(last, run / "model.safetensors")
    assert find_weights(run, "best").path == run / "model.safetensors"  # no evaluation yet
    save_weights_safetensors(best, run / "best.safetensors")
    assert find_weights(run).path == run / "best.safetensors"
    assert find_weights(run, "last").path == run / "model.safetensors"
    assert_same_model(load_model(run).model, best)
    assert_same_model(load_model(run, weights="last").model, last)
    assert find_weights(run / "best.safetensors").run_dir == run.resolve()


def test_accelerate_checkpoint_of_a_run_without_exports(tmp_path: Path, fresh_accelerate, caplog) -> None:
    from accelerate import Accelerator

    from irra_dist.engine.checkpointing import TrainerState, save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    _run_config(run)
    model = _model(9)
    accelerator = Accelerator(cpu=True)
    prepared, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    first = save_checkpoint(accelerator, run, TrainerState(step=1), links=("last", "best"))
    at_first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # a later checkpoint with other weights becomes "last"
        for p in model.parameters():
            p.add_(0.5)
    second = save_checkpoint(accelerator, run, TrainerState(step=2))
    assert not (run / "model.safetensors").exists()  # killed before the first epoch ended

    with caplog.at_level(logging.INFO):
        loaded = load_model(run, weights="last")
    assert loaded.kind == "accelerate_checkpoint" and loaded.source.run_dir == run.resolve()
    assert loaded.source.path == second / "model.safetensors"
    assert "no exported weights" in caplog.text
    assert_same_model(loaded.model, model)
    assert load_model(run / "checkpoints").source.path == first / "model.safetensors"  # best
    best = load_model(run).model.state_dict()
    assert best.keys() == at_first.keys() and all(torch.equal(best[k], v) for k, v in at_first.items())

    # a save interrupted before files.json was written is refused
    (first / "files.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete") as err:
        load_model(first)
    _one_line(err, first)
    # without the run's config.yaml the checkpoint's bare tensors cannot be rebuilt
    (run / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="config.yaml") as err:
        load_model(second)
    _one_line(err, second / "model.safetensors")


# --------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_one_line_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_weights_safetensors(_model(), good)
    pth = tmp_path / "good.pth"
    export_official_checkpoint(_model(), pth)
    cases = {
        "missing": (tmp_path / "nope.safetensors", "weights not found"),
        "empty": (tmp_path / "empty.safetensors", "empty"),
        "text": (tmp_path / "notes.txt", "not a PyTorch file nor a safetensors file"),
        "truncated safetensors": (tmp_path / "cut.safetensors", "truncated or damaged safetensors"),
        "truncated torch": (tmp_path / "cut.pth", "truncated"),
        "folder without weights": (tmp_path / "empty_run", "holds no weights"),
        "damaged model_config": (tmp_path / "edited.safetensors", "unreadable model_config"),
        "weights of another input size": (good, "image_size"),
    }
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not weights\n")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-500])
    (tmp_path / "cut.pth").write_bytes(pth.read_bytes()[:-500])
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.yaml").write_text("{}\n")
    with safe_open(str(good), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(tmp_path / "edited.safetensors"),
              metadata={**meta, MODEL_CONFIG_KEY: meta[MODEL_CONFIG_KEY].replace("vision_heads", "heads")})
    for name, (path, expected) in cases.items():
        kwargs = {"image_size": (96, 32)} if name == "weights of another input size" else {}
        with pytest.raises(CheckpointError, match=expected) as err:
            load_model(path, **kwargs)
        message = _one_line(err, path)
        assert ": " in message and any(fix in message for fix in ("pass", "again", "put")), (name, message)


def test_damaged_deepspeed_checkpoint_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    checkpoint = tmp_path / "checkpoints" / "state-00000003-abcdef"
    (checkpoint / "pytorch_model").mkdir(parents=True)
    (checkpoint / "latest").write_text("pytorch_model")
    (checkpoint / "files.json").write_text("{}")
    with pytest.raises(CheckpointError, match="cannot consolidate the DeepSpeed checkpoint") as err:
        load_model(checkpoint)
    _one_line(err, checkpoint)
    shutil.rmtree(checkpoint / "pytorch_model")
    (checkpoint / "files.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_model(tmp_path / "checkpoints" / "state-00000003-abcdef")
