"""Gradient-cached chunks (``train.chunk_size``): the exact big-batch step at the memory of one chunk.

SDM, ITC and CMPM compare every row of the global batch with every column, so their gradient needs the whole
batch's features, while the towers' activations are what fills the device's memory. The step therefore runs
in two passes over this rank's batch cut into chunks of ``chunk_size`` rows (the GradCache scheme):

1. Every chunk runs forward without a graph; only its global features are kept (plus the values of its
   rank-local losses, ID and MLM, for the non-finite check and the log). The contrastive losses are then
   taken on the cached features of all ranks (gathered as in the plain step) and back-propagated to those
   features alone: ``g = dL_global / d features``, a ``[rows, D]`` pair.
2. Every chunk runs forward again with a graph and back-propagates ``<features, g> + local losses``; the sum
   over chunks of those parameter gradients is the plain step's gradient, term for term.

The random state is captured before each chunk's first forward and restored before its second, as
``torch.utils.checkpoint`` does for its re-forward (with its device-state helpers, inside
``torch.random.fork_rng``), so anything random inside the model (dropout, drop-path) draws the same numbers
in both passes; afterwards the stream continues from where the second pass began. The rank-local losses
keep the plain step's normalisation (sums over the rank's rows divided by ``global count / world size``), so
chunks sum to the same value.

Gradients are reduced once per micro-batch under DDP: every chunk but the last runs in ``no_sync``. Under
DeepSpeed each chunk's backward goes through the engine with the accumulation boundary set only on the last
chunk of a boundary micro-batch, where the engine also steps; ZeRO-2/3 reduce-scatter gradient partitions at
every backward (as they do for accumulation), which is exact but sends the gradients once per chunk.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.utils.checkpoint import get_device_states, set_device_states

from irra_dist.config import Config, ConfigError
from irra_dist.distributed import gather_columns
from irra_dist.losses import irra_accuracies, irra_losses

logger = logging.getLogger(__name__)

GLOBAL_LOSSES = ("sdm", "itc", "cmpm")
"""Losses over the global batch's columns: computed once on the cached features."""


def check_chunking(cfg: Config, deepspeed_config: Mapping[str, Any] | None) -> None:
    """Refuse, with one line, a configuration in which chunks cannot give the plain step's gradient.

    Args:
        cfg: the run config.
        deepspeed_config: the DeepSpeed JSON (as filled from the recipe), None without DeepSpeed.

    Raises:
        ConfigError: DeepSpeed with ``managed_gradient_accumulation: false`` (the engine then owns the
            accumulation boundary, which the chunks must set).
    """
    if cfg.train.chunk_size == 0 or deepspeed_config is None:
        return
    if not deepspeed_config.get("managed_gradient_accumulation", True):
        raise ConfigError("train.chunk_size needs DeepSpeed's managed gradient accumulation (every chunk but "
                          "the last is a non-boundary backward): remove managed_gradient_accumulation=false "
                          "from the DeepSpeed JSON or set train.chunk_size=0")


def build_grad_cache(accelerator: Accelerator, model: torch.nn.Module, cfg: Config) -> GradientCache | None:
    """The chunked step for the trainer, or None when ``train.chunk_size`` is 0 or covers the whole batch."""
    chunk, batch = cfg.train.chunk_size, cfg.train.batch_size
    if chunk == 0:
        return None
    if chunk >= batch:
        logger.info("train.chunk_size=%d covers the per-device batch of %d: the plain step runs", chunk,
                    batch)
        return None
    logger.info("gradient-cached chunks: each device's %d rows run as %d chunks of at most %d rows (exact "
                "whole-batch gradient, one extra forward per step)", batch, -(-batch // chunk), chunk)
    return GradientCache(accelerator, model, cfg)


def split_batch(batch: Mapping[str, Any], chunk_size: int) -> list[dict[str, Any]]:
    """This rank's batch cut into consecutive chunks of `chunk_size` rows (the last may be shorter).

    An empty batch (a rank without samples in the last global batch) gives one empty chunk, so that the
    rank still runs the forward and the collectives of the others.
    """
    rows = int(batch["pids"].shape[0])
    starts = list(range(0, rows, chunk_size)) or [0]
    return [{k: v[s:s + chunk_size] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows
             else v for k, v in batch.items()} for s in starts]


RngState = tuple[torch.Tensor, list[int], list[torch.Tensor]]
"""The CPU generator's state, and the devices and generator states of a GPU forward (none on the CPU)."""


@dataclass
class CachedStep:
    """One micro-batch after the first pass: its losses, accuracies, and what the second pass needs."""

    losses: dict[str, torch.Tensor]
    """``{"<name>_loss": 0-dim}`` in the recipe's order, each this rank's share of the global loss."""
    total: torch.Tensor
    accs: dict[str, torch.Tensor]
    """Accuracies over this rank's rows (MLM: over its masked tokens), as :func:`irra_accuracies`."""
    chunks: list[dict[str, Any]]
    rng: list[RngState]
    """Each chunk's random state before its first forward."""
    features: tuple[torch.Tensor, torch.Tensor] | None
    """The cached image/text features (leaves) when a global loss is on."""
    global_total: torch.Tensor | None
    normalizers: dict[str, float]


class GradientCache:
    """Runs the chunked two-pass step for the trainer (see the module docstring).

    Args:
        accelerator: the run's Accelerator (backward, ``no_sync``, DeepSpeed engine).
        model: the prepared model (DDP / DeepSpeed engine / plain module).
        cfg: the run config (chunk size, losses, weights, temperature).
    """

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, cfg: Config) -> None:
        self.acc = accelerator
        self.model = model
        self.chunk_size = cfg.train.chunk_size
        self.names = list(cfg.loss.names)
        self.global_names = [n for n in self.names if n in GLOBAL_LOSSES]
        self.local_names = [n for n in self.names if n not in GLOBAL_LOSSES]
        self.weights = {n: getattr(cfg.loss, f"{n}_weight") for n in self.names}
        self.temperature = cfg.model.temperature
        self.global_batch = cfg.loss.global_batch
        self.device = accelerator.device
        self.is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

    def forward(self, batch: dict[str, Any], sizes: Sequence[int], normalizers: Mapping[str, float] | None,
                masked: int, classified: int | None = None) -> CachedStep:
        """Pass 1: embed every chunk without a graph and take all losses on the cached features.

        Args:
            batch: this rank's micro-batch, on the device.
            sizes: every rank's row count (for the gather of the global losses).
            normalizers: the plain step's global normalisers, or None for per-rank means
                (``loss.global_batch: false``).
            masked: this rank's masked-token count.
            classified: this rank's rows that the ID loss takes (default: all).
        """
        rows = int(batch["pids"].shape[0])
        classified = rows if classified is None else classified
        norm = dict(normalizers) if normalizers is not None else {"batch": float(max(rows, 1)),
                                                                  "mlm": float(max(masked, 1)),
                                                                  "id": float(max(classified, 1))}
        chunks = split_batch(batch, self.chunk_size)
        rng: list[RngState] = []
        image_feats, text_feats = [], []
        local_sums: dict[str, torch.Tensor] = {}
        acc_sums: dict[str, torch.Tensor] = {}
        logit_scale = None
        with torch.no_grad():
            for chunk in chunks:
                rng.append((torch.get_rng_state(), *get_device_states(chunk["pids"])))
                out = self.model(chunk)
                image_feats.append(out["image_feats"])
                text_feats.append(out["text_feats"])
                logit_scale = out.get("logit_scale")
                for key, value in self._local_losses(out, chunk, norm).items():
                    local_sums[key] = local_sums[key] + value if key in local_sums else value
                _add_weighted_accs(acc_sums, irra_accuracies(out, chunk), out, chunk)
        losses: dict[str, torch.Tensor] = {}
        features = global_total = None
        if self.global_names:
            features = (torch.cat(image_feats).requires_grad_(), torch.cat(text_feats).requires_grad_())
            cached = {"image_feats": features[0], "text_feats": features[1]}
            if logit_scale is not None:
                cached["logit_scale"] = logit_scale
            columns = None
            if self.global_batch:
                columns = gather_columns(features[0], features[1], batch["pids"], sizes)
            losses = irra_losses(cached, batch, self.global_names, self.temperature, self.weights,
                                 columns=columns, normalizers=norm)
            global_total = torch.stack(list(losses.values())).sum()
        losses = {f"{n}_loss": (losses | local_sums)[f"{n}_loss"] for n in self.names}
        total = torch.stack([v.detach() for v in losses.values()]).sum()
        masked_tokens = acc_sums.pop("_masked", None)
        accs = {k: v / max(rows, 1) for k, v in acc_sums.items() if k != "mlm_acc"}
        if "mlm_acc" in acc_sums and masked_tokens is not None:
            accs["mlm_acc"] = acc_sums["mlm_acc"] / masked_tokens.clamp_min(1)
        return CachedStep(losses, total, accs, chunks, rng, features, global_total, norm)

    def backward(self, step: CachedStep, loss_scale: float = 1.0) -> None:
        """Pass 2: re-run each chunk with a graph and back-propagate its share of the step's loss.

        Args:
            step: the result of :meth:`forward` for this micro-batch.
            loss_scale: factor on the loss (the trainer's scaling of a short accumulation group).
        """
        cached_grads: Sequence[torch.Tensor] | None = None
        if step.global_total is not None:
            # Every rank gets here (the skip decision is global), so the gather's backward collective matches.
            image_grad, text_grad = torch.autograd.grad(step.global_total, step.features)
            sizes = [int(c["pids"].shape[0]) for c in step.chunks]
            cached_grads = list(zip(image_grad.split(sizes), text_grad.split(sizes)))
        step.features = step.global_total = None  # free the pass-1 graph before the chunk graphs
        last = len(step.chunks) - 1
        device_type = self.device.type
        # fork_rng puts back the state from before this pass (the trainer draws nothing between the passes).
        with torch.random.fork_rng(devices=step.rng[0][1], device_type=device_type):
            for i, chunk in enumerate(step.chunks):
                cpu_state, devices, device_states = step.rng[i]
                torch.set_rng_state(cpu_state)
                set_device_states(devices, device_states, device_type=device_type)
                with self._sync_context(i == last):
                    out = self.model(chunk)
                    terms = []
                    if cached_grads is not None:
                        image_grad, text_grad = cached_grads[i]
                        terms += [(out["image_feats"] * image_grad).sum(),
                                  (out["text_feats"] * text_grad).sum()]
                    terms += list(self._local_losses(out, chunk, step.normalizers).values())
                    surrogate = torch.stack(terms).sum()
                    self._backward(surrogate * loss_scale if loss_scale != 1.0 else surrogate, i == last)

    def _local_losses(self, out: Mapping[str, torch.Tensor], chunk: Mapping[str, Any],
                      normalizers: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """The chunk's share of the rank-local losses (ID, MLM): sums over its rows / global normalisers."""
        if not self.local_names:
            return {}
        return irra_losses(out, chunk, self.local_names, self.temperature, self.weights,
                           normalizers=normalizers)

    def _sync_context(self, last_chunk: bool) -> contextlib.AbstractContextManager:
        """DDP reduces gradients only after the last chunk (DeepSpeed is told through its boundary flag)."""
        if last_chunk or self.is_deepspeed:
            return contextlib.nullcontext()
        return self.acc.no_sync(self.model)

    def _backward(self, loss: torch.Tensor, last_chunk: bool) -> None:
        if self.is_deepspeed:
            # Accelerate's wrapper sets the boundary and steps the engine when told to sync: only on the
            # last chunk of a micro-batch that ends an accumulation group.
            sync = self.acc.sync_gradients and last_chunk
            self.acc.deepspeed_engine_wrapped.backward(loss, sync_gradients=sync)
        else:
            self.acc.backward(loss)


def _add_weighted_accs(sums: dict[str, torch.Tensor], accs: Mapping[str, torch.Tensor],
                       out: Mapping[str, torch.Tensor], chunk: Mapping[str, Any]) -> None:
    """Accumulate a chunk's accuracies weighted by its rows (MLM: by its masked tokens)."""
    rows = chunk["pids"].shape[0]
    for key, value in accs.items():
        if key == "mlm_acc":
            labelled = (out["mlm_labels"] != 0).sum()
            weighted = value * labelled
            sums["_masked"] = sums["_masked"] + labelled if "_masked" in sums else labelled
        else:
            weighted = torch.nan_to_num(value) * rows
        sums[key] = sums[key] + weighted if key in sums else weighted
