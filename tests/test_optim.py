"""Optimizer groups and lr schedule against the tables of IRRA_SPEC 4.1 and 4.2."""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict

import pytest
import torch
from torch import nn

from irra_dist.config import OptimConfig
from irra_dist.optim import OptimSetupError, build_lr_scheduler, build_optimizer


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 2)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 2 * width),
                                             c_proj=nn.Linear(2 * width, width)))
        self.ln_2 = nn.LayerNorm(width)


class _Tower(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(_Block(width))


class _Visual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 2, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(5, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Tower(width)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, width))


class _Clip(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.visual = _Visual(width)
        self.transformer = _Tower(width)
        self.token_embedding = nn.Embedding(10, width)
        self.positional_embedding = nn.Parameter(torch.randn(7, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, width))


class TinyIRRA(nn.Module):
    """Parameter names as the official IRRA state_dict (IRRA_SPEC 4.4), tiny sizes."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.base_model = _Clip(width)
        self.classifier = nn.Linear(width, classes)
        self.cross_attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.cross_modal_transformer = _Tower(width)
        self.ln_pre_t = nn.LayerNorm(width)
        self.ln_pre_i = nn.LayerNorm(width)
        self.ln_post = nn.LayerNorm(width)
        self.mlm_head = nn.Sequential(OrderedDict(dense=nn.Linear(width, width), gelu=nn.GELU(),
                                                  ln=nn.LayerNorm(width), fc=nn.Linear(width, 10)))


def expected_lr_wd(name: str) -> tuple[float, float]:
    """IRRA_SPEC 4.1's table, written by module membership rather than by substring rules."""
    top = name.split(".")[0]
    is_bias = name.endswith("bias")
    if top in ("classifier", "mlm_head"):
        return (5e-5, 0.0) if is_bias else (5e-5, 4e-5)
    if is_bias:  # CLIP, cross_attn, cross_modal_transformer and ln_pre_t/ln_pre_i/ln_post biases
        return (2e-5, 0.0)
    if top in ("cross_attn", "cross_modal_transformer"):
        return (5e-5, 4e-5)
    return (1e-5, 4e-5)  # CLIP weights and embeddings, and the ln_pre_t/ln_pre_i/ln_post weights


HAND_TABLE = {
    "base_model.visual.conv1.weight": (1e-5, 4e-5),
    "base_model.visual.proj": (1e-5, 4e-5),
    "base_model.transformer.resblocks.0.attn.in_proj_bias": (2e-5, 0.0),
    "base_model.ln_final.bias": (2e-5, 0.0),
    "cross_attn.in_proj_weight": (5e-5, 4e-5),
    "cross_attn.out_proj.bias": (2e-5, 0.0),
    "cross_modal_transformer.resblocks.0.ln_1.bias": (2e-5, 0.0),
    "cross_modal_transformer.resblocks.0.ln_1.weight": (5e-5, 4e-5),
    "cross_modal_transformer.resblocks.0.mlp.c_fc.weight": (5e-5, 4e-5),
    "ln_pre_t.weight": (1e-5, 4e-5),
    "ln_post.bias": (2e-5, 0.0),
    "classifier.weight": (5e-5, 4e-5),
    "classifier.bias": (5e-5, 0.0),
    "mlm_head.fc.bias": (5e-5, 0.0),
    "mlm_head.ln.weight": (5e-5, 4e-5),
}


def _settings(optimizer, model) -> dict[str, tuple[float, float, str]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            out[by_id[id(p)]] = (group["lr"], group["weight_decay"], group["name"])
    return out


def test_official_groups_per_parameter():
    model = TinyIRRA()
    opt = build_optimizer(model)
    got = _settings(opt, model)
    assert set(got) == {n for n, _ in model.named_parameters()}
    for name, _ in model.named_parameters():
        lr, wd, _ = got[name]
        assert (lr, wd) == pytest.approx(expected_lr_wd(name), abs=1e-12), name
    for name, (lr, wd) in HAND_TABLE.items():
        assert got[name][:2] == pytest.approx((lr, wd), abs=1e-12), name
    # Four groups, as IRRA_SPEC 4.1's table, with readable names.
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        ("base", 1e-5, 4e-5), ("bias", 2e-5, 0.0), ("head+cross", 5e-5, 4e-5), ("head_bias", 5e-5, 0.0)]
    assert isinstance(opt, torch.optim.Adam)
    assert opt.defaults["eps"] == 1e-3 and opt.defaults["betas"] == (0.9, 0.999)


class _Wrapped(nn.Module):
    def __init__(self, inner: nn.Module, attr: str) -> None:
        super().__init__()
        self.add_module(attr, inner)


@pytest.mark.parametrize("attrs", [["module"], ["_orig_mod"], ["_orig_mod", "module"]])
def test_wrapper_prefixes_are_ignored(attrs):
    inner = TinyIRRA()
    model = inner
    for attr in attrs:
        model = _Wrapped(model, attr)
    got = _settings(build_optimizer(model), inner)
    for name, (lr, wd) in HAND_TABLE.items():
        assert got[name][:2] == pytest.approx((lr, wd), abs=1e-12)


def test_frozen_parameters_are_skipped():
    model = TinyIRRA()
    model.base_model.visual.conv1.weight.requires_grad_(False)
    model.classifier.bias.requires_grad_(False)
    got = _settings(build_optimizer(model), model)
    assert "base_model.visual.conv1.weight" not in got and "classifier.bias" not in got
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(OptimSetupError, match="no trainable parameters"):
        build_optimizer(model)


def test_grouped_adam_equals_one_group_per_tensor():
    """The official optimizer has one group per tensor; grouping must not change a single number."""
    torch.manual_seed(0)
    model = TinyIRRA()
    reference = copy.deepcopy(model)
    ours = build_optimizer(model)
    per_tensor = [{"params": [p], "lr": expected_lr_wd(n)[0], "weight_decay": expected_lr_wd(n)[1]}
                  for n, p in reference.named_parameters()]
    official = torch.optim.Adam(per_tensor, lr=1e-5, betas=(0.9, 0.999), eps=1e-3)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for (_, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        official.step()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-7), name


def test_other_optimizers():
    model = TinyIRRA()
    adamw = build_optimizer(model, OptimConfig(optimizer="adamw", eps=1e-8, weight_decay=0.01))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["eps"] == 1e-8
    assert _settings(adamw, model)["classifier.weight"][:2] == pytest.approx((5e-5, 0.01))
    sgd = build_optimizer(model, OptimConfig(optimizer="sgd", momentum=0.8))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.8
    assert _settings(sgd, model)["base_model.ln_final.bias"][:2] == pytest.approx((2e-5, 0.0))


# ------------------------------------------------------------------------------------------------
# Schedule

# IRRA_SPEC 4.2: multiplier of the base lr during epoch e (1-based), as printed there.
EPOCH_TABLE = {1: "0.10", 2: "0.28", 3: "0.46", 4: "0.64", 5: "0.82", 6: "1.000", 7: "0.9992", 10: "0.9870",
               20: "0.8485", 30: "0.5993", 40: "0.3186", 50: "0.0955", 55: "0.0291", 60: "0.000815"}


def _per_epoch_multipliers(config=None, num_epochs=60):
    opt = build_optimizer(TinyIRRA(), config)
    base = [g["lr"] for g in opt.param_groups]
    sched = build_lr_scheduler(opt, config, num_epochs=num_epochs)
    values = {}
    for epoch in range(1, num_epochs + 1):
        values[epoch] = [g["lr"] / b for g, b in zip(opt.param_groups, base)]
        opt.step()
        sched.step()
    return values


def test_official_per_epoch_table():
    values = _per_epoch_multipliers()
    for epoch, printed in EPOCH_TABLE.items():
        decimals = len(printed.split(".")[1])
        for value in values[epoch]:  # every group follows the same curve
            assert f"{value:.{decimals}f}" == printed, (epoch, value)


def test_per_step_sampling_matches_per_epoch():
    per_epoch = _per_epoch_multipliers()
    config = OptimConfig(step_per="step")
    opt = build_optimizer(TinyIRRA(), config)
    base = [g["lr"] for g in opt.param_groups]
    steps = 7
    sched = build_lr_scheduler(opt, config, num_epochs=60, steps_per_epoch=steps)
    for step in range(60 * steps):
        mult = [g["lr"] / b for g, b in zip(opt.param_groups, base)]
        if step % steps == 0:
            assert mult == pytest.approx(per_epoch[step // steps + 1], rel=1e-12)
        if step == 3:  # inside the first warmup epoch: t = 3/7, linear from 0.1
            a = (3 / 7) / 5
            assert mult[0] == pytest.approx(0.1 * (1 - a) + a, rel=1e-12)
        opt.step()
        sched.step()


def test_target_lr_step_mode_and_constant_warmup():
    # cosine towards an absolute target lr: each group ends at target_lr
    config = OptimConfig(target_lr=1e-6, warmup_epochs=2)
    opt = build_optimizer(TinyIRRA(), config)
    sched = build_lr_scheduler(opt, config, num_epochs=10)
    for _ in range(10):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-6] * 4, rel=1e-9)

    step_cfg = OptimConfig(scheduler="step", milestones=[20, 50], gamma=0.1)
    values = _per_epoch_multipliers(step_cfg)
    expected = {5: 0.82, 6: 1.0, 20: 1.0, 21: 0.1, 50: 0.1, 51: 0.01, 60: 0.01}
    for epoch, value in expected.items():
        assert values[epoch][0] == pytest.approx(value, rel=1e-9), epoch

    const = _per_epoch_multipliers(OptimConfig(warmup_method="constant", scheduler="constant"), num_epochs=8)
    assert [const[e][0] for e in range(1, 9)] == pytest.approx([0.1] * 5 + [1.0] * 3)


def test_scheduler_state_roundtrip():
    opt = build_optimizer(TinyIRRA())
    sched = build_lr_scheduler(opt)
    for _ in range(12):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer(TinyIRRA())
    sched2 = build_lr_scheduler(opt2)
    sched2.load_state_dict(state)
    opt2.step()
    sched.step()
    sched2.step()
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr(), rel=1e-12)


def test_schedule_errors():
    opt = build_optimizer(TinyIRRA())
    with pytest.raises(OptimSetupError, match="steps_per_epoch"):
        build_lr_scheduler(opt, OptimConfig(step_per="step"))
    with pytest.raises(OptimSetupError, match="warmup_epochs"):
        build_lr_scheduler(opt, OptimConfig(), num_epochs=5)
    with pytest.raises(OptimSetupError, match="milestones"):
        build_lr_scheduler(opt, dataclasses.replace(OptimConfig(), milestones=[50, 20], scheduler="step"))
