"""Distributed retrieval evaluation: every rank embeds its part, the parts are gathered and scored once.

Each rank encodes its contiguous part of the gallery images and of the query captions
(:func:`irra_dist.data.pipeline.build_eval_loaders`), under ``no_grad`` and the training autocast. Features,
pids and positions are gathered on every rank (no gradient is needed, so Accelerate's gather is used; parts
may differ in size or be empty), put back in split order by position, and the main process computes the
exact metrics (:func:`irra_dist.evaluation.metrics.retrieval_metrics`) and shares them with the others.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from tqdm import tqdm

from irra_dist.config import Config, ConfigError, EvalConfig
from irra_dist.distributed import all_reduce_sum
from irra_dist.engine.accel import unwrap, zero_stage
from irra_dist.engine.checkpointing import full_parameters
from irra_dist.engine.failures import inject_failure
from irra_dist.evaluation.metrics import RetrievalInputError, format_metrics_table, retrieval_metrics

logger = logging.getLogger(__name__)

Metrics = dict[str, dict[str, float]]


def show_progress(accelerator: Accelerator) -> bool:
    """Progress bars on the main process, and only on a terminal (not in redirected logs)."""
    return accelerator.is_main_process and sys.stderr.isatty()


def embedding_autocast(accelerator: Accelerator, precision: str) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of the autocast contexts for ``eval.precision`` (see :class:`EvalConfig`)."""
    if precision == "train":
        return accelerator.autocast
    device_type = accelerator.device.type
    if precision == "fp16" and device_type == "cuda":
        return lambda: torch.autocast(device_type, dtype=torch.float16)
    if precision in ("fp16", "fp32"):
        return lambda: torch.autocast(device_type, enabled=False)
    raise ValueError(f"unknown eval precision {precision!r}: use train, fp16 or fp32")


@torch.no_grad()
def embed(accelerator: Accelerator, encode: Callable[[torch.Tensor], torch.Tensor],
          batches: Iterable[dict[str, torch.Tensor]], key: str, empty_input: torch.Tensor,
          desc: str, autocast: Callable[[], AbstractContextManager[Any]], lockstep: bool = False,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode this rank's items.

    Args:
        accelerator: supplies the device.
        encode: ``model.encode_image`` or ``model.encode_text``.
        batches: dicts with `key`, ``pids`` and ``index``.
        key: ``"images"`` or ``"caption_ids"``.
        empty_input: a zero-row input, encoded when this rank has no items (to learn the feature width).
        desc: progress-bar label.
        autocast: a factory of the autocast context (:func:`embedding_autocast`).
        lockstep: every rank runs as many forward passes as the rank with the most batches, encoding
            `empty_input` once its own batches are done. Needed under ZeRO-3, whose forward hooks all-gather
            parameters: a rank with one batch fewer would leave the others waiting in a collective forever.

    Returns:
        ``(features [n, D] fp32, pids [n], index [n])`` on the accelerator's device.
    """
    feats, pids, index = [], [], []
    device = accelerator.device
    bar = tqdm(batches, desc=desc, disable=not show_progress(accelerator), leave=False)
    for batch in (_lockstep(bar, device) if lockstep else bar):
        inject_failure("eval")
        if batch is None:  # this rank is done; the others still run a forward pass
            with autocast():
                feats.append(encode(empty_input.to(device)).float())
            continue
        with autocast():
            feats.append(encode(batch[key].to(device, non_blocking=True)).float())
        pids.append(batch["pids"].to(device, non_blocking=True))
        index.append(batch["index"].to(device, non_blocking=True))
    if not feats:  # no batch here (nor anywhere, in lockstep): learn the feature width
        with autocast():
            feats.append(encode(empty_input.to(device)).float())
    if not pids:
        pids.append(torch.empty(0, dtype=torch.int64, device=device))
        index.append(torch.empty(0, dtype=torch.int64, device=device))
    return torch.cat(feats), torch.cat(pids), torch.cat(index)


def _lockstep(batches: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """`batches`, then None until every rank has run out (one tiny all-reduce per batch)."""
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if all_reduce_sum(torch.tensor([float(batch is not None)], device=device)).item() == 0:
            return
        yield batch


def gather_in_order(accelerator: Accelerator, feats: torch.Tensor, pids: torch.Tensor,
                    index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather every rank's rows and sort them by their position in the split.

    Parts may differ in size (one fewer item, skipped unreadable items, or none at all): rows are padded to
    the longest part for the collective and the padding is dropped using the gathered sizes.

    Returns:
        ``(features, pids, index)`` of all ranks, ordered by ``index``, on every rank.
    """
    sizes = accelerator.gather(torch.tensor([feats.shape[0]], device=feats.device))
    longest = int(sizes.max())
    if accelerator.num_processes > 1:
        feats = accelerator.gather(_pad_rows(feats, longest))
        pids = accelerator.gather(_pad_rows(pids, longest))
        index = accelerator.gather(_pad_rows(index, longest))
        keep = (torch.arange(longest, device=sizes.device)[None, :] < sizes[:, None]).reshape(-1)
        feats, pids, index = feats[keep], pids[keep], index[keep]
    order = torch.argsort(index)
    return feats[order], pids[order], index[order]


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad])


def evaluate_retrieval(accelerator: Accelerator, model: nn.Module, gallery: Any, queries: Any,
                       cfg: EvalConfig, on_features: Callable[..., None] | None = None) -> Metrics:
    """Embed, gather and score one evaluation split. All ranks call it; all get the same metrics.

    Args:
        accelerator: the run's Accelerator.
        model: the (possibly wrapped) IRRA model.
        gallery: this rank's gallery loader (``images``, ``pids``, ``index``).
        queries: this rank's query loader (``caption_ids``, ``pids``, ``index``).
        cfg: the ``eval`` section (``chunk_size``, ``i2t``, ``precision``).
        on_features: called on the main process with the gathered ``gallery_feats, gallery_pids,
            gallery_index, query_feats, query_index`` (e.g. to draw retrieval examples without re-embedding).

    Returns:
        ``{"t2i": {...}}`` plus ``"i2t"`` when ``cfg.i2t``; values in percent.

    Raises:
        RetrievalInputError: features or ids that cannot be scored (on every rank).
    """
    was_training = model.training
    model.eval()
    unwrapped = unwrap(accelerator, model)
    height, width = unwrapped.base_model.visual.image_size
    try:
        with full_parameters(accelerator, unwrapped):
            # Read inside the context: under ZeRO-3 a parameter's shape is that of its local partition.
            context = unwrapped.base_model.positional_embedding.shape[0]
            autocast = embedding_autocast(accelerator, cfg.precision)
            lockstep = zero_stage(accelerator) == 3
            g_feats, g_pids, g_index = embed(accelerator, unwrapped.encode_image, gallery, "images",
                                             torch.zeros(0, 3, height, width), "gallery", autocast, lockstep)
            q_feats, q_pids, q_index = embed(accelerator, unwrapped.encode_text, queries, "caption_ids",
                                             torch.zeros(0, context, dtype=torch.int64), "queries", autocast,
                                             lockstep)
    finally:
        model.train(was_training)
    g_feats, g_pids, g_index = gather_in_order(accelerator, g_feats, g_pids, g_index)
    q_feats, q_pids, q_index = gather_in_order(accelerator, q_feats, q_pids, q_index)
    missing = (gallery.num_items - len(g_index), queries.num_items - len(q_index))
    if any(missing):
        logger.warning("evaluation skipped %d unreadable gallery images and %d queries", *missing)

    outcome: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            result = {"t2i": retrieval_metrics(q_feats, g_feats, q_pids, g_pids, chunk_size=cfg.chunk_size)}
            if cfg.i2t:
                result["i2t"] = retrieval_metrics(g_feats, q_feats, g_pids, q_pids, chunk_size=cfg.chunk_size)
            outcome = [result]
            if on_features is not None:
                on_features(g_feats, g_pids, g_index, q_feats, q_index)
        except RetrievalInputError as err:
            # Shared with the other ranks so that all of them stop instead of waiting in a collective.
            outcome = [str(err)]
    outcome = broadcast_object_list(outcome)
    if isinstance(outcome[0], str):
        raise RetrievalInputError(outcome[0])
    return outcome[0]


def flat_metrics(metrics: Metrics, prefix: str = "eval") -> dict[str, float]:
    """``{"t2i": {"R1": x}}`` -> ``{"eval/t2i_R1": x}`` for trackers."""
    return {f"{prefix}/{task}_{name}": value for task, row in metrics.items() for name, value in row.items()}


def embedding_precision(setting: str, run_cfg: Config | None) -> str:
    """``eval.precision`` for ``irra-eval --precision setting``: an explicit autocast setting wins; "auto"
    keeps the run's own ``eval.precision``, and fp16 for a file without a run config (an official best.pth,
    which the official code evaluates in fp16)."""
    if setting != "auto":
        return "train"  # the accelerator was built with `setting` as its mixed precision
    return run_cfg.eval.precision if run_cfg is not None else "fp16"


def export_target(target: str | os.PathLike, out: str | os.PathLike, *, weights: str = "best",
                  image_size: tuple[int, int] | None = None, stride_size: int | None = None,
                  ) -> tuple[Path, str | None]:
    """Write the weights of a run folder, checkpoint folder or weights file as an official ``best.pth``.

    Returns:
        The weights file that was exported, and a note when the official code would build a different
        architecture from the file (:func:`irra_dist.model.weights.official_loader_mismatch`).

    Raises:
        CheckpointError, ConfigError: nothing readable at `target`.
    """
    from irra_dist.model.weights import export_official_checkpoint, load_model, official_loader_mismatch

    loaded = load_model(target, weights=weights, image_size=image_size, stride_size=stride_size)
    export_official_checkpoint(loaded.model, out)
    return loaded.source.path, official_loader_mismatch(loaded.model)


def evaluate_target(target: str | os.PathLike, *, shards: str | os.PathLike | None = None,
                    **kwargs: Any) -> dict[str, Any]:
    """Evaluate a run folder, checkpoint folder, weights file or official ``best.pth`` on one shard set.

    ``shards`` defaults to the run's ``data.shards``; the other arguments are those of
    :func:`evaluate_on_sets`, whose single result this returns.
    """
    return evaluate_on_sets(target, None if shards is None else [shards], **kwargs)[0]


def evaluate_on_sets(target: str | os.PathLike, shard_sets: Sequence[str | os.PathLike] | None = None, *,
                     split: str = "test", weights: str = "best", batch_size: int = 256, num_workers: int = 2,
                     chunk_size: int = 1024, i2t: bool = False, image_size: tuple[int, int] | None = None,
                     stride_size: int | None = None, precision: str = "auto") -> list[dict[str, Any]]:
    """Evaluate one model on the `split` of each shard set (cross-dataset evaluation): the model is loaded
    once. Works in one process or under ``accelerate launch`` (each process embeds its part).

    Args:
        target: what to evaluate: anything :func:`irra_dist.model.weights.load_model` reads.
        shard_sets: shard folders; default the run's ``data.shards``.
        split: ``"test"`` or ``"val"``.
        weights: for a run folder, ``"best"`` (best.safetensors when present) or ``"last"``.
        batch_size: items per batch and process.
        num_workers: loader workers per process.
        chunk_size: queries scored at a time.
        i2t: also score image-to-text.
        image_size: input size override (files that do not record it, official best.pth: 384x128).
        stride_size: patch stride for such files.
        precision: ``train.mixed_precision``-style autocast setting; "auto" embeds as the run's
            ``eval.precision`` (see :func:`embedding_precision`).

    Returns:
        One ``{"target", "shards", "split", "num_gallery", "num_queries", "metrics"}`` per shard set, in
        order.

    Raises:
        CheckpointError, ConfigError, ShardError, RetrievalInputError: bad input.
    """
    from irra_dist.data.pipeline import build_eval_loaders
    from irra_dist.engine.accel import build_accelerator
    from irra_dist.model.weights import find_weights, load_model
    from irra_dist.run_config import load_run_config

    source = find_weights(target, weights)
    file = source.path
    own_cfg = load_run_config(source.run_dir) if source.run_dir is not None else None
    if not shard_sets:
        if own_cfg is None:
            raise ConfigError(f"{file} does not name its shards: pass --shards DIR")
        shard_sets = [own_cfg.eval_shards()]
    run_cfg = own_cfg or Config()
    run_cfg = replace(run_cfg, train=replace(run_cfg.train, mixed_precision=precision, compile=False,
                                             grad_accum_steps=1))
    accelerator = build_accelerator(run_cfg)
    results = []
    try:
        model = load_model(source, image_size=image_size, stride_size=stride_size).model
        model = model.to(accelerator.device)
        size = tuple(model.base_model.visual.image_size)
        eval_cfg = EvalConfig(split=split, batch_size=batch_size, chunk_size=chunk_size, i2t=i2t,
                              precision=embedding_precision(precision, own_cfg))
        for shards in shard_sets:
            gallery, queries = build_eval_loaders(shards, split, rank=accelerator.process_index,
                                                  world_size=accelerator.num_processes, batch_size=batch_size,
                                                  num_workers=num_workers, image_size=size,
                                                  pin_memory=accelerator.device.type == "cuda")
            metrics = evaluate_retrieval(accelerator, model, gallery, queries, eval_cfg)
            logger.info("%s on %s (%s split):\n%s", file, shards, split, format_metrics_table(metrics))
            results.append({"target": str(file), "shards": str(shards), "split": split,
                            "num_gallery": gallery.num_items, "num_queries": queries.num_items,
                            "metrics": metrics})
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return results


def format_cross_table(results: Sequence[dict[str, Any]], task: str = "t2i") -> str:
    """One row per evaluated shard set (R1, R5, R10, mAP, mINP of `task`), in the metrics table's layout.

    Rows are named by the shard folder's name (full paths only where two names coincide)."""
    names = [Path(str(r["shards"]).rstrip("/")).name or str(r["shards"]) for r in results]
    if len(set(names)) < len(names):
        names = [str(r["shards"]) for r in results]
    return format_metrics_table({n: r["metrics"][task] for n, r in zip(names, results)}, label="shards")
