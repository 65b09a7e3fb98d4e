"""The IRRA model: outputs, the IRR module's structure, MLM-head selection, text-feature modes, init, size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from irra_dist.config import ModelConfig
from irra_dist.model import IRRA, build_clip, build_irra, build_irra_from_config, is_new_parameter

VOCAB, LENGTH, EOT = 60, 16, 59
# embed_dim 128 gives the IRR module 128 // 64 = 2 heads
SIZES = dict(embed_dim=128, image_size=(64, 32), patch_size=16, stride_size=16, vision_width=64,
             vision_layers=1, vision_heads=2, context_length=LENGTH, vocab_size=VOCAB, text_width=64,
             text_heads=2, text_layers=2)


def tiny_irra(seed: int = 0, **kwargs) -> IRRA:
    torch.manual_seed(seed)
    return build_irra(7, cmt_depth=2, **SIZES, **kwargs)


def make_batch(batch_size: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    caption = torch.randint(1, EOT - 3, (batch_size, LENGTH), generator=gen)
    lengths = torch.tensor([5, 9, 12, 15, 7, 10][:batch_size])
    caption[torch.arange(LENGTH) > lengths[:, None]] = 0
    caption[torch.arange(batch_size), lengths] = EOT
    caption[:, 0] = EOT - 1
    mlm_ids, labels = caption.clone(), torch.zeros_like(caption)
    for row, positions in enumerate([[1, 3], [2], [4, 5, 6], [1], [2, 3], [1]][:batch_size]):
        labels[row, positions] = caption[row, positions]
        mlm_ids[row, positions] = EOT - 2  # the mask token
    return {"images": torch.randn(batch_size, 3, 64, 32, generator=gen), "caption_ids": caption,
            "mlm_ids": mlm_ids, "mlm_labels": labels, "pids": torch.tensor([0, 1, 0, 2, 3, 1][:batch_size])}


def masked_caption_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` as the loaders give it with data.mask_global_text: the masked captions once, as caption_ids."""
    out = {k: v for k, v in batch.items() if k != "mlm_ids"}
    out["caption_ids"] = batch["mlm_ids"]
    return out


def test_forward_outputs_and_shapes():
    model = tiny_irra()
    batch = make_batch()
    out = model(batch)
    masked = int((batch["mlm_labels"] != 0).sum())
    assert set(out) == {"image_feats", "text_feats", "logit_scale", "image_logits", "text_logits",
                        "mlm_logits", "mlm_labels"}
    assert out["image_feats"].shape == out["text_feats"].shape == (4, 128)
    assert out["image_logits"].shape == out["text_logits"].shape == (4, 7)
    assert out["mlm_logits"].shape == (masked, VOCAB)
    assert all(v.dtype == torch.float32 for k, v in out.items() if k != "mlm_labels")
    assert out["logit_scale"].shape == () and out["logit_scale"].item() == pytest.approx(50.0)
    assert "logit_scale" not in model.state_dict()
    # global features are the pooled CLS / EOT features, identical to the inference encoders
    with torch.no_grad():
        torch.testing.assert_close(out["image_feats"], model.encode_image(batch["images"]))
        torch.testing.assert_close(out["text_feats"], model.encode_text(batch["caption_ids"]))
    torch.testing.assert_close(out["image_logits"], F.linear(out["image_feats"], model.classifier.weight,
                                                             model.classifier.bias))

    no_irr = tiny_irra(with_mlm=False)
    out = no_irr({k: batch[k] for k in ("images", "caption_ids", "pids")})
    assert set(out) == {"image_feats", "text_feats", "logit_scale", "image_logits", "text_logits"}
    assert not any(k.startswith(("cross", "mlm_head", "ln_p")) for k in no_irr.state_dict())
    no_classifier = build_irra(0, **SIZES, with_mlm=False)
    assert "image_logits" not in no_classifier({k: batch[k] for k in ("images", "caption_ids")})


def test_heads_run_in_fp32_under_autocast():
    model = tiny_irra()
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert all(v.dtype == torch.float32 for k, v in out.items() if k != "mlm_labels")
    # an fp32 classifier on the fp32 features: a bf16 matmul would be off by ~1e-3 relative
    expected = F.linear(out["text_feats"], model.classifier.weight, model.classifier.bias)
    torch.testing.assert_close(out["text_logits"], expected, rtol=1e-6, atol=1e-7)


class ReferenceBlock(nn.Module):
    """The official cross-modal block: LND, nn.MultiheadAttention without mask, QuickGELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


def test_cross_former_matches_official_structure_without_residual():
    model = tiny_irra()
    for module in (model.ln_pre_t, model.ln_pre_i, model.ln_post, model.cross_attn):
        for p in module.parameters():  # move off the default init so every term matters
            nn.init.normal_(p, mean=float(p.detach().mean()), std=0.1)
    dim, heads = 128, 2
    assert model.cross_attn.num_heads == heads
    cross = nn.MultiheadAttention(dim, heads, batch_first=True)
    cross.load_state_dict(model.cross_attn.state_dict(), strict=True)
    blocks = nn.ModuleList(ReferenceBlock(dim, heads) for _ in range(2))
    blocks.load_state_dict(model.cross_modal_transformer.resblocks.state_dict(), strict=True)

    text = torch.randn(3, LENGTH, dim)
    image = torch.randn(3, 9, dim)
    q = F.layer_norm(text, (dim,), model.ln_pre_t.weight, model.ln_pre_t.bias)
    kv = F.layer_norm(image, (dim,), model.ln_pre_i.weight, model.ln_pre_i.bias)
    x = cross(q, kv, kv, need_weights=False)[0]  # no "+ q": the official code has no residual here
    x = x.transpose(0, 1)
    for block in blocks:
        x = block(x)
    expected = F.layer_norm(x.transpose(0, 1), (dim,), model.ln_post.weight, model.ln_post.bias)
    with torch.no_grad():
        torch.testing.assert_close(model.cross_former(text, image), expected, rtol=1e-5, atol=1e-5)
        # the test can tell: adding the residual changes the result
        with_residual = model.cross_attn(model.ln_pre_t(text), model.ln_pre_i(image)) + model.ln_pre_t(text)
        residual_out = model.ln_post(model.cross_modal_transformer(with_residual))
        assert not torch.allclose(residual_out, expected, atol=1e-3)


def test_masked_only_mlm_logits_equal_all_positions():
    model = tiny_irra()
    batch = make_batch()
    out_masked = model(batch)
    model.mlm_logits_at_masked_only = False
    out_all = model(batch)
    assert out_all["mlm_logits"].shape == (4 * LENGTH, VOCAB)
    torch.testing.assert_close(out_all["mlm_labels"], batch["mlm_labels"].reshape(-1))
    selected = batch["mlm_labels"].reshape(-1) != 0
    torch.testing.assert_close(out_masked["mlm_logits"], out_all["mlm_logits"][selected],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_masked["mlm_labels"], out_all["mlm_labels"][selected])
    # and so the official CE (ignore_index 0 over all positions) is unchanged
    torch.testing.assert_close(F.cross_entropy(out_masked["mlm_logits"], out_masked["mlm_labels"]),
                               F.cross_entropy(out_all["mlm_logits"], out_all["mlm_labels"], ignore_index=0))


class CountingCalls:
    def __init__(self, fn):
        self.fn, self.rows = fn, []

    def __call__(self, ids, *args, **kwargs):
        self.rows.append(ids.shape[0])
        return self.fn(ids, *args, **kwargs)


def test_masked_caption_batch_runs_the_text_tower_once(monkeypatch: pytest.MonkeyPatch):
    model = tiny_irra()
    batch = masked_caption_batch(make_batch())
    counter = CountingCalls(model.base_model.encode_text)
    monkeypatch.setattr(model.base_model, "encode_text", counter)
    out = model(batch)
    assert counter.rows == [4]
    out_two_keys = model(make_batch())
    assert counter.rows == [4, 8]  # clean and masked captions: one pass over both stacked
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(out["text_feats"], model.encode_text(make_batch()["mlm_ids"]))
    torch.testing.assert_close(out["mlm_logits"], out_two_keys["mlm_logits"], rtol=1e-5, atol=1e-5)


def test_global_feature_pools_the_caption_ids_it_is_given():
    model = tiny_irra()
    batch = make_batch()
    out_clean, out_masked = model(batch), model(masked_caption_batch(batch))
    with torch.no_grad():
        torch.testing.assert_close(out_clean["text_feats"], model.encode_text(batch["caption_ids"]),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_masked["text_feats"], model.encode_text(batch["mlm_ids"]),
                                   rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_clean["text_feats"], out_masked["text_feats"], atol=1e-4)
    # the IRR branch sees the masked caption in both forms
    torch.testing.assert_close(out_clean["mlm_logits"], out_masked["mlm_logits"], rtol=1e-5, atol=1e-5)


def test_new_module_init_follows_official_stds():
    torch.manual_seed(0)
    dim, depth = 512, 4
    clip = build_clip(embed_dim=dim, image_size=(32, 32), vision_width=64, vision_layers=1, vision_heads=1,
                      context_length=8, vocab_size=2048, text_width=64, text_heads=1, text_layers=1)
    model = IRRA(clip, 300, cmt_depth=depth)
    attn_std, proj_std, fc_std = 512 ** -0.5, 512 ** -0.5 * 8 ** -0.5, 1024 ** -0.5
    checks = [(model.classifier.weight, 1e-3), (model.cross_attn.in_proj_weight, attn_std),
              (model.cross_attn.out_proj.weight, proj_std), (model.mlm_head.dense.weight, fc_std),
              (model.mlm_head.fc.weight, proj_std)]
    for block in model.cross_modal_transformer.resblocks:
        checks += [(block.attn.in_proj_weight, attn_std), (block.attn.out_proj.weight, proj_std),
                   (block.mlp.c_fc.weight, fc_std), (block.mlp.c_proj.weight, proj_std)]
    for tensor, std in checks:
        assert tensor.detach().mean().abs().item() < 0.05 * std
        assert tensor.detach().std().item() == pytest.approx(std, rel=0.03)
    zeros = [model.classifier.bias, model.cross_attn.in_proj_bias, model.cross_attn.out_proj.bias]
    for block in model.cross_modal_transformer.resblocks:
        zeros += [block.attn.in_proj_bias, block.attn.out_proj.bias]
    assert all(torch.count_nonzero(t) == 0 for t in zeros)
    for ln in (model.ln_pre_t, model.ln_pre_i, model.ln_post, model.mlm_head.ln):
        assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    # Linear biases keep PyTorch's default uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), not zero
    bias = model.mlm_head.dense.bias.detach()
    assert bias.abs().max() <= dim ** -0.5 and bias.std() > 0.3 * dim ** -0.5


def test_vit_b16_parameter_count_matches_official():
    with torch.device("meta"):
        model = build_irra(11003)  # defaults: ViT-B/16 at 384x128, cmt_depth 4, vocab 49408
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())
    assert round(count(model) / 1e6, 2) == 194.54
    assert round(count(model.base_model) / 1e6, 2) == 149.62
    assert round(count(model.cross_attn) / 1e6, 3) == 1.051
    assert round(count(model.cross_modal_transformer) / 1e6, 3) == 12.610
    assert round(count(model.mlm_head) / 1e6, 3) == 25.610
    assert model.base_model.visual.positional_embedding.shape == (193, 768)
    new = sum(p.numel() for n, p in model.named_parameters() if is_new_parameter(n))
    assert new == count(model) - count(model.base_model)


def test_grad_checkpointing_keeps_loss_and_grads():
    model = tiny_irra()
    batch = make_batch()

    def step() -> list[torch.Tensor]:
        model.zero_grad()
        out = model(batch)
        loss = (F.cross_entropy(out["mlm_logits"], out["mlm_labels"]) + out["image_logits"].square().mean()
                + (out["image_feats"] * out["text_feats"]).sum())
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    grads = step()
    model.set_grad_checkpointing(True)
    for g, g_ckpt in zip(grads, step()):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-5, atol=1e-6)


def test_build_from_config_random_and_pretrained(tmp_path: Path):
    sizes = {k: v for k, v in SIZES.items() if k != "image_size"}
    cfg = ModelConfig(pretrained="none", image_size=(64, 32), cmt_depth=1, temperature=0.05, **sizes)
    model = build_irra_from_config(cfg, num_classes=5)
    assert model.classifier.out_features == 5 and len(model.cross_modal_transformer.resblocks) == 1
    assert model.logit_scale.item() == pytest.approx(20.0)
    assert model.mlm_logits_at_masked_only

    torch.manual_seed(3)
    clip = build_clip(**{**SIZES, "image_size": (32, 32)})
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    cfg = ModelConfig(pretrained=str(tmp_path / "clip.pt"), image_size=(64, 32), grad_checkpointing=True)
    model = build_irra_from_config(cfg, num_classes=5, with_mlm=False)
    assert model.base_model.visual.num_y == 4 and model.base_model.transformer.grad_checkpointing
    torch.testing.assert_close(model.base_model.token_embedding.weight, clip.token_embedding.weight)


@pytest.mark.parametrize("masked_captions_once", [True, False])
def test_empty_batch_gives_empty_outputs(masked_captions_once: bool):
    # A rank holds zero rows when the last global batch is smaller than the world size.
    model = tiny_irra()
    full = masked_caption_batch(make_batch()) if masked_captions_once else make_batch()
    batch = {k: v[:0] for k, v in full.items()}
    out = model(batch)
    for key in ("image_feats", "text_feats", "image_logits", "text_logits", "mlm_logits", "mlm_labels"):
        assert out[key].shape[0] == 0, key
    assert model.encode_image(batch["images"]).shape[0] == 0
    assert model.encode_text(batch["caption_ids"]).shape[0] == 0
