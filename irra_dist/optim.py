"""Optimizer with the official IRRA parameter groups, and its warmup + cosine schedule (IRRA_SPEC 4.1-4.2).

The official code builds one parameter group per tensor from rules on the parameter NAME; here tensors with
the same (lr, weight_decay) share a group, which is the same arithmetic with four groups instead of ~370.
The schedule multiplies each group's base lr by a per-epoch factor: linear warmup, then cosine (or step /
constant). Stepped once per epoch it reproduces the official `LRSchedulerWithWarmup`; stepped per optimizer
step it samples the same curve at fractional epochs.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from irra_dist.config import OptimConfig

logger = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_HEAD_KEYS = ("classifier", "mlm_head")


class OptimSetupError(ValueError):
    """An optimizer or schedule that cannot be built; the message names the fix."""


def canonical_name(name: str) -> str:
    """Strip DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes, in any nesting."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                stripped = True
    return name


def param_settings(name: str, config: OptimConfig) -> tuple[str, float, float]:
    """The official per-parameter rules, applied in the official order (later rules override).

    1. base lr and weight decay; 2. "cross" in the name: lr x lr_factor; 3. "bias" in the name:
    lr x bias_lr_factor and weight_decay_bias (this overrides rule 2 for cross-module biases);
    4. "classifier" or "mlm_head" in the name: lr x lr_factor (their biases keep weight_decay_bias).

    Args:
        name: the parameter name (wrapper prefixes are stripped).
        config: the optimizer settings.

    Returns:
        ``(category, lr, weight_decay)``; category is base, cross, bias, head or head_bias.
    """
    name = canonical_name(name)
    lr, wd, category = config.lr, config.weight_decay, "base"
    if "cross" in name:
        lr, category = config.lr * config.lr_factor, "cross"
    if "bias" in name:
        lr, wd, category = config.lr * config.bias_lr_factor, config.weight_decay_bias, "bias"
    if any(key in name for key in _HEAD_KEYS):
        lr = config.lr * config.lr_factor
        category = "head_bias" if category == "bias" else "head"
    return category, lr, wd


def build_param_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """Trainable parameters grouped by equal (lr, weight_decay), in first-appearance order.

    Each group carries a ``name`` joining the rule categories it holds (e.g. ``cross+head``).
    """
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        category, lr, wd = param_settings(name, config)
        group = groups.setdefault((lr, wd), {"params": [], "lr": lr, "weight_decay": wd, "categories": []})
        group["params"].append(param)
        if category not in group["categories"]:
            group["categories"].append(category)
    if not groups:
        raise OptimSetupError("the model has no trainable parameters (all have requires_grad=False): "
                              "unfreeze some before building the optimizer")
    result = []
    for group in groups.values():
        categories = group.pop("categories")
        result.append({**group, "name": "+".join(categories)})
    return result


def _fused_ok(groups: list[dict]) -> bool:
    """Fused kernels need every parameter on CUDA in a floating dtype."""
    return all(p.is_cuda and p.is_floating_point() for g in groups for p in g["params"])


def build_optimizer(model: nn.Module, config: OptimConfig | None = None) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD over the official parameter groups.

    Adam uses coupled (L2) weight decay and ``config.eps`` (1e-3 officially). Fused kernels are used when the
    parameters are already on CUDA; otherwise PyTorch picks its foreach implementation per step.

    Args:
        model: the model (DDP / torch.compile wrappers are fine: their prefixes are ignored).
        config: optimizer settings; None gives the irra_official values.

    Returns:
        The optimizer; each param group has ``name``, ``lr`` and ``weight_decay``.
    """
    config = config or OptimConfig()
    groups = build_param_groups(model, config)
    impl = {"fused": True} if _fused_ok(groups) else {}
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=config.lr, betas=config.betas, eps=config.eps, **impl)
    elif config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, **impl)
    elif config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, **impl)
    else:
        raise OptimSetupError(f"unknown optimizer {config.optimizer!r}: use adam, adamw or sgd")
    logger.info("optimizer %s: %s", config.optimizer, ", ".join(
        f"{g['name']} ({len(g['params'])} tensors, lr {g['lr']:.2e}, wd {g['weight_decay']:.1e})"
        for g in optimizer.param_groups))
    return optimizer


@dataclass
class LRMultiplier:
    """The factor applied to one group's base lr at (possibly fractional) epoch ``t = last_epoch / per``.

    A plain dataclass rather than a closure so that LambdaLR's state_dict can save and restore it.

    Attributes:
        scheduler: "cosine", "step" or "constant" after warmup.
        num_epochs: length of the schedule in epochs.
        warmup_epochs: epochs of warmup (0 for none).
        warmup_factor: factor at t = 0.
        warmup_method: "linear" (from warmup_factor to 1) or "constant" (warmup_factor throughout).
        target_ratio: cosine end point, target_lr / this group's base lr.
        milestones: epochs where "step" multiplies by gamma.
        gamma: "step" decay per milestone.
        steps_per_epoch: 1 when stepped per epoch; the optimizer steps per epoch when stepped per step.
    """

    scheduler: str
    num_epochs: int
    warmup_epochs: int
    warmup_factor: float
    warmup_method: str
    target_ratio: float
    milestones: tuple[int, ...]
    gamma: float
    steps_per_epoch: int = 1

    def __call__(self, count: int) -> float:
        t = count / self.steps_per_epoch
        if t < self.warmup_epochs:
            if self.warmup_method == "constant":
                return self.warmup_factor
            alpha = t / self.warmup_epochs
            return self.warmup_factor * (1 - alpha) + alpha
        if self.scheduler == "step":
            return self.gamma ** bisect.bisect_right(self.milestones, t)
        if self.scheduler == "constant":
            return 1.0
        # Clamped so that steps past the end stay at the target instead of climbing back up.
        ratio = min((t - self.warmup_epochs) / (self.num_epochs - self.warmup_epochs), 1.0)
        return self.target_ratio + (1 - self.target_ratio) * 0.5 * (1 + math.cos(math.pi * ratio))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig | None = None,
                       num_epochs: int = 60, steps_per_epoch: int | None = None) -> LambdaLR:
    """Warmup then cosine / step / constant, as a LambdaLR with one multiplier per param group.

    With ``config.step_per == "epoch"`` call ``scheduler.step()`` once after each epoch (epoch e, 1-based,
    then runs with ``last_epoch = e - 1``, as the official code). With ``"step"`` call it after every
    optimizer step; step k x steps_per_epoch then has the lr of the start of epoch k + 1.

    Args:
        optimizer: built by :func:`build_optimizer` (each group's current lr is its base lr).
        config: schedule settings; None gives the irra_official values.
        num_epochs: total training epochs.
        steps_per_epoch: optimizer steps per epoch; required when stepping per step.

    Raises:
        OptimSetupError: inconsistent settings (see the message).
    """
    config = config or OptimConfig()
    if num_epochs < 1:
        raise OptimSetupError(f"num_epochs must be >= 1, got {num_epochs}")
    if config.scheduler == "cosine" and num_epochs <= config.warmup_epochs:
        raise OptimSetupError(f"cosine schedule needs num_epochs ({num_epochs}) > optim.warmup_epochs "
                              f"({config.warmup_epochs}): lower optim.warmup_epochs")
    if list(config.milestones) != sorted(config.milestones):
        raise OptimSetupError(f"optim.milestones must be increasing, got {config.milestones}")
    if config.step_per == "step":
        if steps_per_epoch is None or steps_per_epoch < 1:
            raise OptimSetupError("optim.step_per=step needs steps_per_epoch >= 1 (optimizer steps per "
                                  f"epoch), got {steps_per_epoch}")
        per = steps_per_epoch
    else:
        per = 1
    multipliers = [
        LRMultiplier(scheduler=config.scheduler, num_epochs=num_epochs, warmup_epochs=config.warmup_epochs,
                     warmup_factor=config.warmup_factor, warmup_method=config.warmup_method,
                     target_ratio=config.target_lr / group.get("initial_lr", group["lr"]),
                     milestones=tuple(config.milestones), gamma=config.gamma, steps_per_epoch=per)
        for group in optimizer.param_groups
    ]
    return LambdaLR(optimizer, multipliers)
