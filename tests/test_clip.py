"""CLIP towers and OpenAI checkpoint loading, on tiny checkpoints written here in OpenAI's formats."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from irra_dist.model import CheckpointError, build_clip, load_openai_clip
from irra_dist.model.clip import ResidualAttentionBlock, set_attn_impl

# A tiny "OpenAI" CLIP: square 64x64 input, patch 16 -> a 4x4 grid; widths are multiples of 64 because the
# loader infers heads = width // 64, as OpenAI's build_model does.
TINY = dict(embed_dim=32, image_size=(64, 64), patch_size=16, stride_size=16, vision_width=128,
            vision_layers=2, vision_heads=2, context_length=12, vocab_size=50, text_width=64, text_heads=1,
            text_layers=2)
# OpenAI keeps these in fp16 (Linear/Conv/MHA/proj); LayerNorms and embeddings stay fp32.
HALF_MARKERS = ("conv1", "in_proj", "out_proj", "c_fc", "c_proj")


def _is_half(key: str) -> bool:
    return any(m in key for m in HALF_MARKERS) or key in ("text_projection", "visual.proj")


def openai_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd = {k: (v.half() if _is_half(k) else v.clone()) for k, v in build_clip(**TINY).state_dict().items()}
    # extra entries OpenAI's archives carry
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    sd["input_resolution"] = torch.tensor(64)
    sd["context_length"] = torch.tensor(TINY["context_length"])
    sd["vocab_size"] = torch.tensor(TINY["vocab_size"])
    return sd


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(sd: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive whose state_dict() has exactly the keys of `sd`, like OpenAI's .pt files."""
    root = _Holder()
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, _Holder())
            module = getattr(module, name)
        module.register_buffer(leaf, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(root, torch.zeros(1)), str(path))


def reference_pos_embed(posemb: torch.Tensor, num_y: int, num_x: int) -> torch.Tensor:
    cls, grid = posemb[:1], posemb[1:]
    side = int(round(grid.shape[0] ** 0.5))
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(num_y, num_x), mode="bilinear", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(num_y * num_x, -1)])


@pytest.fixture(params=["torchscript", "state_dict"])
def openai_file(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = openai_state_dict()
    path = tmp_path / "clip.pt"
    if request.param == "torchscript":
        save_torchscript(sd, path)
    else:
        torch.save(sd, path)
    return path, sd


@pytest.mark.parametrize("image_size,stride,grid", [((96, 32), 16, (6, 2)), ((64, 40), 12, (5, 3))])
def test_load_openai_clip_rebuilds_for_non_square_input(openai_file, image_size, stride, grid):
    path, sd = openai_file
    model = load_openai_clip(path, image_size=image_size, stride_size=stride)
    assert (model.visual.num_y, model.visual.num_x) == grid
    assert model.visual.conv1.stride == (stride, stride)
    own = model.state_dict()
    assert all(v.dtype == torch.float32 for v in own.values())
    assert set(own) == set(sd) - {"logit_scale", "input_resolution", "context_length", "vocab_size"}
    for key, value in own.items():
        if key != "visual.positional_embedding":
            torch.testing.assert_close(value, sd[key].float(), rtol=0, atol=0, msg=key)
    expected = reference_pos_embed(sd["visual.positional_embedding"].float(), *grid)
    torch.testing.assert_close(own["visual.positional_embedding"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(own["visual.positional_embedding"][0], sd["visual.positional_embedding"][0])

    images = torch.randn(2, 3, *image_size)
    text = torch.randint(1, 49, (2, TINY["context_length"]))
    text[:, 5] = TINY["vocab_size"] - 1
    with torch.no_grad():
        img_tokens, txt_tokens = model(images, text)
    assert img_tokens.shape == (2, 1 + grid[0] * grid[1], TINY["embed_dim"])
    assert txt_tokens.shape == (2, TINY["context_length"], TINY["embed_dim"])


def test_architecture_inferred_from_tensors(openai_file):
    model = load_openai_clip(openai_file[0], image_size=(64, 64))
    sizes = model.sizes
    assert (sizes.vision_width, sizes.vision_layers, sizes.vision_heads, sizes.patch_size) == (128, 2, 2, 16)
    assert (sizes.text_width, sizes.text_layers, sizes.text_heads) == (64, 2, 1)
    assert (sizes.embed_dim, sizes.context_length, sizes.vocab_size) == (32, 12, 50)
    # same size as the source: the positional embedding is copied, not resized
    torch.testing.assert_close(model.visual.positional_embedding.detach(),
                               openai_file[1]["visual.positional_embedding"])


def test_openai_name_resolves_to_cache_and_checks_sha(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"\.cache/clip/ViT-B-16\.pt"):
        load_openai_clip("ViT-B/16")
    cache = tmp_path / ".cache" / "clip"
    cache.mkdir(parents=True)
    torch.save(openai_state_dict(), cache / "ViT-B-16.pt")
    assert load_openai_clip("ViT-B/16", image_size=(64, 32)).visual.num_x == 2
    with pytest.raises(CheckpointError, match="SHA-256 .* expected 5806e77c"):
        load_openai_clip("ViT-B/16", verify_checksum=True)
    mine = tmp_path / "mine.pt"
    mine.write_bytes((cache / "ViT-B-16.pt").read_bytes())
    with pytest.raises(CheckpointError, match="no published SHA-256"):
        load_openai_clip(mine, verify_checksum=True)


def _assert_one_line(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert "\n" not in message and str(path) in message


def test_bad_files_give_one_clear_error(tmp_path: Path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="not found") as err:
        load_openai_clip(missing)
    _assert_one_line(err, missing)

    random_dict = tmp_path / "random.pt"
    torch.save({"weight": torch.randn(3, 3), "bias": torch.randn(3)}, random_dict)
    with pytest.raises(CheckpointError, match="not a ViT CLIP checkpoint") as err:
        load_openai_clip(random_dict)
    _assert_one_line(err, random_dict)

    for kind in ("torchscript", "state_dict"):
        whole = tmp_path / f"whole_{kind}.pt"
        sd = openai_state_dict()
        save_torchscript(sd, whole) if kind == "torchscript" else torch.save(sd, whole)
        truncated = tmp_path / f"truncated_{kind}.pt"
        truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
        with pytest.raises(CheckpointError, match="truncated") as err:
            load_openai_clip(truncated)
        _assert_one_line(err, truncated)

    resnet = tmp_path / "rn50.pt"
    torch.save({"visual.layer1.0.conv1.weight": torch.randn(4, 4, 1, 1),
                "visual.attnpool.positional_embedding": torch.randn(50, 8)}, resnet)
    with pytest.raises(CheckpointError, match="ResNet CLIP") as err:
        load_openai_clip(resnet)
    _assert_one_line(err, resnet)

    text_file = tmp_path / "notes.pt"
    text_file.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a PyTorch file"):
        load_openai_clip(text_file)


class OfficialBlock(nn.Module):
    """CLIP's ResidualAttentionBlock as the official code writes it: LND layout, nn.MultiheadAttention."""

    def __init__(self, width: int, heads: int, causal_len: int | None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = nn.LayerNorm(width)
        self.mask = (torch.full((causal_len, causal_len), float("-inf")).triu(1)
                     if causal_len is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=self.mask)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_math_and_official_blocks_agree(causal: bool):
    torch.manual_seed(0)
    width, heads, length = 64, 4, 9
    block = ResidualAttentionBlock(width, heads)
    nn.init.normal_(block.attn.in_proj_bias, std=0.1)  # non-zero biases so the q/k/v split is exercised
    reference = OfficialBlock(width, heads, length if causal else None)
    reference.load_state_dict(block.state_dict(), strict=True)
    x = torch.randn(3, length, width, requires_grad=True)
    expected = reference(x.transpose(0, 1)).transpose(0, 1)
    for impl in ("sdpa", "math"):
        set_attn_impl(block, impl)
        torch.testing.assert_close(block(x, causal), expected, rtol=1e-5, atol=1e-5)
    grad_sdpa = torch.autograd.grad(block(x, causal).sum(), x)[0]
    set_attn_impl(block, "sdpa")
    grad_math = torch.autograd.grad(block(x, causal).sum(), x)[0]
    torch.testing.assert_close(grad_sdpa, grad_math, rtol=1e-5, atol=1e-5)


def test_causal_mask_blocks_future_tokens():
    torch.manual_seed(0)
    model = build_clip(**TINY)
    text = torch.randint(1, 40, (1, TINY["context_length"]))
    changed = text.clone()
    changed[0, 7:] = 3
    with torch.no_grad():
        a, b = model.encode_text(text), model.encode_text(changed)
    torch.testing.assert_close(a[0, :7], b[0, :7])
    assert not torch.allclose(a[0, 7:], b[0, 7:])


def test_pooled_outputs_equal_all_token_rows():
    torch.manual_seed(0)
    model = build_clip(**{**TINY, "image_size": (64, 32)})
    images = torch.randn(2, 3, 64, 32)
    text = torch.randint(1, 40, (2, TINY["context_length"]))
    eot = torch.tensor([4, 9])
    text[torch.arange(2), eot] = TINY["vocab_size"] - 1
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images, all_tokens=False),
                                   model.encode_image(images)[:, 0])
        torch.testing.assert_close(model.encode_text(text, all_tokens=False),
                                   model.encode_text(text)[torch.arange(2), eot])


def test_grad_checkpointing_keeps_outputs_and_grads():
    torch.manual_seed(0)
    model = build_clip(**{**TINY, "image_size": (64, 32)})
    images = torch.randn(2, 3, 64, 32)
    text = torch.randint(1, 49, (2, TINY["context_length"]))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        img, txt = model(images, text)
        loss = img.square().mean() + txt.square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = run()
    model.set_grad_checkpointing(True)
    loss_ckpt, grads_ckpt = run()
    torch.testing.assert_close(loss_ckpt, loss)
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g)


def test_random_init_uses_clip_stds():
    torch.manual_seed(0)
    width, layers = 256, 2
    model = build_clip(embed_dim=128, image_size=(32, 32), vision_width=64, vision_layers=1, vision_heads=1,
                       context_length=77, vocab_size=2000, text_width=width, text_heads=4, text_layers=layers)
    block = model.transformer.resblocks[0]
    expected = {
        "token_embedding": (model.token_embedding.weight, 0.02),
        "positional_embedding": (model.positional_embedding, 0.01),
        "in_proj_weight": (block.attn.in_proj_weight, width ** -0.5),
        "out_proj": (block.attn.out_proj.weight, width ** -0.5 * (2 * layers) ** -0.5),
        "c_fc": (block.mlp.c_fc.weight, (2 * width) ** -0.5),
        "c_proj": (block.mlp.c_proj.weight, width ** -0.5 * (2 * layers) ** -0.5),
        "text_projection": (model.text_projection, width ** -0.5),
        "visual.proj": (model.visual.proj, 64 ** -0.5),
    }
    for name, (tensor, std) in expected.items():
        assert tensor.detach().std().item() == pytest.approx(std, rel=0.1), name
    assert torch.count_nonzero(block.attn.in_proj_bias) == 0
    assert torch.count_nonzero(block.attn.out_proj.bias) == 0
