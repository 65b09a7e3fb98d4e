"""The training loop: Accelerate (single device, DDP, DeepSpeed ZeRO-2/3, CPU) around the IRRA pieces.

One optimizer step sees a global batch of ``train.batch_size x processes x train.grad_accum_steps``
samples. The contrastive losses span the global *micro*-batch (``batch_size x processes``): image/text
features are all-gathered with gradient (:mod:`irra_dist.distributed`), each rank's losses are sums over its
rows divided by ``global count / world size``, and DDP's gradient averaging then gives exactly the gradient
of one process holding the whole micro-batch, uneven or empty last batches included (docs/TRAINING.md).

Host syncs per micro-step: the masked-position selection inside the model, and one all-reduced
"loss is finite" flag. Row and masked-token counts travel between ranks as host integers (over gloo), and
loss statistics stay on the device until a log line needs them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, set_seed
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from irra_dist.config import Config, ConfigError, dump_config, save_config
from irra_dist.data.mixture import TrainSource, has_identities
from irra_dist.data.pipeline import TrainLoader, build_eval_loaders
from irra_dist.data.shards import MANIFEST_NAME, ShardError
from irra_dist.data.sources import is_remote
from irra_dist.data.streaming import StreamTrainLoader
from irra_dist.distributed import all_reduce_sum, gather_columns, require_differentiable_gather
from irra_dist.engine.accel import build_accelerator, ddp_ignores_buffers
from irra_dist.engine.checkpointing import (
    CHECKPOINTS_DIR,
    TrainerState,
    export_weights,
    find_latest_run,
    load_checkpoint,
    resolve_checkpoint,
    run_dir_of,
    save_checkpoint,
)
from irra_dist.engine.evaluate import evaluate_retrieval, flat_metrics, show_progress
from irra_dist.engine.failures import PeerFailure, PeerFailureWatch, announce, inject_failure
from irra_dist.engine.gradcache import build_grad_cache
from irra_dist.engine.init_from import build_model_for_training
from irra_dist.engine.runfolder import RunFolderClaim, claim_run_folder
from irra_dist.engine.runlog import (
    BEST_WEIGHTS_FILE,
    CONFIG_FILE,
    LOG_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    MetricsWriter,
    read_metrics,
    run_logging,
)
from irra_dist.engine.tracking import finish_wandb, init_wandb, new_run_id
from irra_dist.evaluation.metrics import format_metrics_table
from irra_dist.evaluation.selection import RULE_TITLES, select_results
from irra_dist.losses import irra_accuracies, irra_losses
from irra_dist.model import CheckpointError
from irra_dist.optim import build_lr_scheduler, build_optimizer
from irra_dist.retrieval.examples import RetrievalExamples
from irra_dist.run_config import absolute_locations

logger = logging.getLogger(__name__)

ACC_NAMES = ("img_acc", "txt_acc", "mlm_acc")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss; the message says what to change."""


class TrainingInterrupted(Exception):
    """Ctrl-C stopped the run; `checkpoint` is its last complete checkpoint (None: there was none yet, and a
    new run's folder was removed)."""

    def __init__(self, run_dir: Path | None, checkpoint: Path | None) -> None:
        super().__init__(f"training of {run_dir} interrupted")
        self.run_dir = run_dir
        self.checkpoint = checkpoint


# --------------------------------------------------------------------------------------------------
# Run folder and data preparation


def resolve_resume(cfg: Config, resume: str | os.PathLike | None) -> Path | None:
    """The checkpoint folder to resume from: ``"latest"`` or a path (run folder, link, checkpoint).

    ``"latest"`` means ``output_dir/run_name`` when ``train.run_name`` is set, else the run under
    ``train.output_dir`` with the most recent ``checkpoints/last``.

    Raises:
        CheckpointError: nothing to resume.
    """
    if resume is None:
        return None
    if str(resume) == "latest":
        named = Path(cfg.train.output_dir) / cfg.train.run_name if cfg.train.run_name else None
        run = named if named is not None else find_latest_run(cfg.train.output_dir)
        if run is None:
            raise CheckpointError(f"--resume latest found no run with checkpoints/last under "
                                  f"{cfg.train.output_dir}: start without --resume, or pass a run folder")
        return resolve_checkpoint(run)
    return resolve_checkpoint(resume)


def _new_run_dir(accelerator: Accelerator, cfg: Config) -> Path:
    """``output_dir/<run_name or timestamp_name>``, named on the main process so every rank agrees."""
    name = [cfg.train.run_name or f"{datetime.now():%Y%m%d_%H%M%S}_{cfg.name}"]
    name = broadcast_object_list(name)
    return Path(cfg.train.output_dir) / name[0]


def _claim_on_main(accelerator: Accelerator, run_dir: Path, *, new: bool) -> RunFolderClaim:
    """Claim the run folder on the main process; every rank raises the same ConfigError if that fails."""
    claim, outcome = RunFolderClaim(run_dir, None, False), [None]
    if accelerator.is_main_process:
        try:
            claim = claim_run_folder(run_dir, new=new)
        except ConfigError as err:
            outcome = [str(err)]
    outcome = broadcast_object_list(outcome)
    if outcome[0] is not None:
        raise ConfigError(outcome[0])
    return claim


def build_demo_shards(shards_dir: Path, image_size: tuple[int, int]) -> None:
    """Generate the synthetic demo dataset and write its shards to `shards_dir` (raw images are dropped).

    Images are stored pre-resized to the training size as raw PPM, the fastest format to load
    (docs/BENCHMARKS.md), since the demo is bounded by the CPU.
    """
    import tempfile

    from irra_dist.data.shards import build_shards
    from irra_dist.synthetic.dataset import generate_synthetic_dataset

    shards_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=shards_dir.parent, prefix=f".{shards_dir.name}-raw-") as raw:
        workers = max(1, min(4, os.cpu_count() or 1))
        dataset = generate_synthetic_dataset(Path(raw) / "CUHK-PEDES", workers=workers)
        build_shards("CUHK-PEDES", dataset, shards_dir, pre_resize=tuple(image_size), pre_resize_format="ppm",
                     workers=workers)


def generates_demo_data(cfg: Config) -> bool:
    """Whether missing shards at ``data.shards`` are to be generated: asked explicitly, or the folder is the
    demo recipe's own location (``data.demo_shards``); never at some other, possibly mistyped, path."""
    if cfg.data.build_demo_if_missing:
        return True
    own = cfg.data.demo_shards
    return bool(own) and os.path.abspath(own) == os.path.abspath(cfg.data.shards)


def _cache_args(cfg: Config) -> dict[str, Any]:
    """Where remote shards are cached (data.cache_dir, data.cache_max_gb; 0 means no cap)."""
    return {"cache_dir": cfg.data.cache_dir or None, "cache_max_gb": cfg.data.cache_max_gb or None}


def build_train_loader(cfg: Config, accelerator: Accelerator) -> TrainLoader | StreamTrainLoader:
    """This rank's training loader: indexed (wids) or streaming, as ``data.mode`` says."""
    common = dict(global_batch_size=cfg.train.batch_size * accelerator.num_processes,
                  rank=accelerator.process_index, world_size=accelerator.num_processes, seed=cfg.train.seed,
                  num_workers=cfg.data.num_workers, image_size=tuple(cfg.model.image_size),
                  image_aug=cfg.data.image_aug, drop_last=cfg.data.drop_last, mlm=cfg.data.mlm,
                  mask_global_text=cfg.data.mask_global_text, pin_memory=accelerator.device.type == "cuda",
                  **_cache_args(cfg))
    sources = cfg.data.shards
    if cfg.data.sources:
        sources = [TrainSource(s.shards, s.weight, s.name) for s in cfg.data.sources]
    if cfg.data.mode == "stream":
        return StreamTrainLoader(sources, shuffle_buffer=cfg.data.shuffle_buffer, **common)
    return TrainLoader(sources, sampler=cfg.data.sampler, num_instances=cfg.data.num_instances,
                       **common)


def ensure_shards(accelerator: Accelerator, cfg: Config) -> None:
    """Build the demo shards on the main process if the recipe asks for it and they are missing.

    Raises:
        ShardError: no shards at ``data.shards`` of a demo recipe pointed elsewhere (one line with the fix).
    """
    shards = Path(cfg.data.shards)
    if cfg.data.sources or is_remote(cfg.data.shards) or (shards / MANIFEST_NAME).is_file():
        return
    if not generates_demo_data(cfg):
        if cfg.data.demo_shards:
            raise ShardError(f"no {MANIFEST_NAME} in {shards}: check data.shards (the demo generates its "
                             f"data only at {cfg.data.demo_shards}), or add data.build_demo_if_missing=true "
                             "to generate the synthetic demo data there")
        return  # a missing set is reported by the loader with a one-line ShardError
    if accelerator.is_main_process:
        logger.info("no shards in %s: generating the synthetic demo dataset and its shards", shards)
        build_demo_shards(shards, cfg.model.image_size)
    accelerator.wait_for_everyone()


def evaluation_splits(cfg: Config, manifest: dict[str, Any]) -> list[str]:
    """The splits evaluated every ``eval.eval_period`` epochs: the selecting split first, then the tracked
    ones the shards hold (ICFG-PEDES has no val split unless built with ``--val-ids``).

    Raises:
        ConfigError: the selecting split has no images.
    """
    def images(split: str) -> int:
        return int(manifest["splits"].get(split, {}).get("num_images", 0))

    if images(cfg.eval.split) == 0:
        hint = ("rebuild the shards with a val split carved from the training identities "
                "(irra-build-shards ... --val-ids N), or select on test with eval.split=test"
                if cfg.eval.split == "val" else "rebuild the shards")
        raise ConfigError(f"eval.split={cfg.eval.split} selects the best checkpoint, but {cfg.eval_shards()} "
                          f"has no {cfg.eval.split} images: {hint}")
    return [cfg.eval.split, *(s for s in cfg.eval.track_splits if images(s) > 0)]


def eval_manifest(cfg: Config, loader: TrainLoader | StreamTrainLoader) -> dict[str, Any]:
    """The manifest of the shard set evaluated (with a mixture: the source ``eval.source`` names)."""
    if not cfg.data.sources:
        return loader.manifest
    name = cfg.eval.source or cfg.data.sources[0].name
    return loader.source_manifests[name]


def id_loss_scope(cfg: Config, loader: TrainLoader | StreamTrainLoader) -> tuple[bool, str | None]:
    """Whether the ID loss stays on for this data, and the line to log about it (None: nothing to say).

    A set built without identities (``identities: per_image``, e.g. a JSONL file without pids) makes every
    image its own class: a classifier over one-image classes only memorises them. So such a set trains no
    class: alone, it turns the ID loss off; in a mixture, the classifier covers the labelled sources'
    identities and the ID loss leaves the other sources' rows out (SDM, MLM still use every row).
    """
    if "id" not in cfg.loss.names:
        return False, None
    per_image = [name if cfg.data.sources else str(cfg.data.shards)
                 for name, m in loader.source_manifests.items() if not has_identities(m)]
    if not per_image:
        return True, None
    if loader.num_id_classes == 0:
        return False, (f"{', '.join(per_image)} has no identities (every image is its own; built without "
                       "pids), so the ID loss is turned off: an ID classifier over one-image classes only "
                       "memorises them")
    labelled = [name for name, m in loader.source_manifests.items() if has_identities(m)]
    return True, (f"{', '.join(per_image)} has no identities (built without pids): the ID loss classifies "
                  f"the {loader.num_id_classes} identities of {', '.join(labelled)} and leaves its rows out")


# --------------------------------------------------------------------------------------------------
# Host-side exchange of per-rank counts


class _HostExchange:
    """All-gathers a few host integers per step without a device sync (a gloo group beside NCCL)."""

    def __init__(self) -> None:
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.group = None
        if self.world > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")

    def gather(self, values: list[int]) -> list[list[int]]:
        """Every rank's `values`, in rank order."""
        if self.world == 1:
            return [values]
        local = torch.tensor(values, dtype=torch.int64)
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local, group=self.group)
        return [t.tolist() for t in out]


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------
# Statistics


class _Stats:
    """Loss and accuracy sums kept on the device; reduced over ranks only when a log line needs them.

    Loss values are each rank's share of the global-batch loss, so their sum over ranks divided by the
    number of micro-batches is the global loss per micro-batch.
    """

    def __init__(self, loss_keys: list[str], device: torch.device) -> None:
        self.loss_keys = loss_keys
        self.device = device
        self.sums = torch.zeros(len(loss_keys) + 1 + len(ACC_NAMES), dtype=torch.float64, device=device)
        self.rows = self.masked = self.micro = 0
        self.samples = 0

    def add(self, losses: dict[str, torch.Tensor], total: torch.Tensor, accs: dict[str, torch.Tensor],
            rows: int, masked: int, global_rows: int) -> None:
        values = [losses[k].detach() for k in self.loss_keys] + [total.detach()]
        weights = {"img_acc": rows, "txt_acc": rows, "mlm_acc": masked}
        # nan_to_num: a rank with zero rows has NaN accuracies, weighted by zero rows.
        values += [torch.nan_to_num(accs[k]) * weights[k] if k in accs else total.new_zeros(())
                   for k in ACC_NAMES]
        self.sums += torch.stack([v.double() for v in values])
        self.rows += rows
        self.masked += masked
        self.micro += 1
        self.samples += global_rows

    def reduce(self, skipped: int) -> dict[str, float]:
        """Global means over ranks and micro-batches (one collective and one host sync)."""
        host = torch.tensor([self.rows, self.masked, self.micro, skipped], dtype=torch.float64,
                            device=self.device)
        values = all_reduce_sum(torch.cat([self.sums, host])).tolist()
        n = len(self.loss_keys) + 1
        rows, masked, micro, skipped_all = values[-4:]
        out = {k: v / max(micro, 1) for k, v in zip(self.loss_keys + ["loss"], values[:n])}
        accs = dict(zip(ACC_NAMES, values[n:n + len(ACC_NAMES)]))
        for key, denom in (("img_acc", rows), ("txt_acc", rows), ("mlm_acc", masked)):
            if denom > 0:
                out[key] = accs[key] / denom
        out["skipped_samples"] = skipped_all
        out["micro_batches"] = micro
        return out

    def reset(self) -> None:
        self.sums.zero_()
        self.rows = self.masked = self.micro = self.samples = 0


# --------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Holds one run's objects; :func:`train` is the public entry point."""

    def __init__(self, cfg: Config, accelerator: Accelerator, run_dir: Path, loader: TrainLoader) -> None:
        self.cfg = cfg
        self.acc = accelerator
        self.run_dir = run_dir
        self.loader = loader
        self.device = accelerator.device
        self.world = accelerator.num_processes
        self.accum = cfg.train.grad_accum_steps
        self.names = list(cfg.loss.names)
        self.weights = {n: getattr(cfg.loss, f"{n}_weight") for n in self.names}
        self.loss_keys = [f"{n}_loss" for n in self.names]
        self.metrics = MetricsWriter(run_dir / METRICS_FILE, accelerator.is_main_process)
        self.exchange = _HostExchange()
        self.state = TrainerState()
        self.consecutive_nonfinite = 0
        self.discard_group = False
        """A micro-batch of the current accumulation group had a non-finite loss: the group trains nothing."""
        self.is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

        self.num_classes = num_classes = loader.num_id_classes if "id" in self.names else 0
        # Same seed on every rank before building: identical initial weights everywhere.
        set_seed(cfg.train.seed)
        model = build_model_for_training(cfg, num_classes)
        self.num_params = sum(p.numel() for p in model.parameters())
        # On the device before the optimizer exists, so that it can pick fused CUDA kernels.
        optimizer = build_optimizer(model.to(self.device), cfg.optim)
        self.steps_per_epoch = math.ceil(len(loader) / self.accum)
        # The scheduler stays outside prepare(): Accelerate would step it once per process, and DeepSpeed
        # once per optimizer step; it is stepped here, per epoch or per step as the recipe says.
        self.scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.num_epochs, self.steps_per_epoch)
        ddp_ignores_buffers(model)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.grad_cache = build_grad_cache(accelerator, self.model, cfg)
        self.gallery = self.queries = None
        self.examples: dict[str, RetrievalExamples] = {}  # per split, built on first use, main process only
        self.examples_png: Path | None = None
        self.last_metrics: dict | None = None
        self.results: dict[str, dict[str, Any]] = {}
        # split -> (gallery, queries); the selecting split first (evaluation_splits).
        self.eval_sets: dict[str, tuple[Any, Any]] = {}
        self.completed = False
        if cfg.eval.eval_period > 0:
            for split in evaluation_splits(cfg, eval_manifest(cfg, loader)):
                self.eval_sets[split] = self._eval_loaders(split)
            self.gallery, self.queries = self.eval_sets[cfg.eval.split]

    def _eval_loaders(self, split: str) -> tuple[Any, Any]:
        return build_eval_loaders(
            self.cfg.eval_shards(), split, rank=self.acc.process_index, world_size=self.world,
            batch_size=self.cfg.eval.batch_size, num_workers=self.cfg.data.num_workers,
            image_size=tuple(self.cfg.model.image_size), pin_memory=self.device.type == "cuda",
            **_cache_args(self.cfg))

    # ---------------------------------------------------------------------------------------------

    def base_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def resume_from(self, checkpoint: Path) -> None:
        self.state = load_checkpoint(self.acc, checkpoint)
        self.scheduler.load_state_dict(self.state.scheduler)
        self.metrics.truncate_after(self.state.step)
        logger.info("resumed from %s: epoch %d, batch %d, step %d, best R1 %.3f", checkpoint,
                    self.state.epoch, self.state.batch_in_epoch, self.state.step, self.state.best_r1)

    def save(self, links: tuple[str, ...]) -> None:
        self.state.scheduler = self.scheduler.state_dict()
        save_checkpoint(self.acc, self.run_dir, self.state, links)

    def export(self, name: str) -> None:
        export_weights(self.acc, self.model, self.run_dir / name, {"config": dump_config(self.cfg)})

    # ---------------------------------------------------------------------------------------------

    def _batches(self, epoch: int) -> Iterator[tuple[int, dict[str, Any]]]:
        self.loader.set_epoch(epoch)
        self.loader.start_batch = self.state.batch_in_epoch
        start = self.state.batch_in_epoch
        bar = tqdm(self.loader, total=len(self.loader) - start, desc=f"epoch {epoch}", leave=False,
                   disable=not show_progress(self.acc), dynamic_ncols=True)
        yield from enumerate(bar, start=start)

    def _micro_step(self, batch: dict[str, Any], group_size: int, stats: tuple[_Stats, ...],
                    where: str) -> None:
        """Forward, global-batch losses, and backward (or a skip when the loss is not finite anywhere).

        A non-finite loss discards its whole accumulation group: the gradients its earlier micro-batches
        accumulated are dropped and its later micro-batches are skipped (every rank agrees, so DDP's
        gradient all-reduce is skipped on all of them alike).
        """
        inject_failure("train")
        if self.discard_group:
            return
        rows = int(batch["pids"].shape[0])
        masked = int((batch["mlm_labels"] != 0).sum()) if "mlm_labels" in batch else 0
        classified = int((batch["pids"] < self.num_classes).sum())  # rows the ID loss takes (host tensor)
        counts = self.exchange.gather([rows, masked, classified])
        sizes = [c[0] for c in counts]
        global_rows, global_masked = sum(sizes), sum(c[1] for c in counts)
        global_classified = sum(c[2] for c in counts)
        batch = _to_device(batch, self.device)
        columns, normalizers = None, None
        if self.cfg.loss.global_batch:
            normalizers = {"batch": max(global_rows, 1) / self.world,
                           "mlm": max(global_masked, 1) / self.world,
                           "id": max(global_classified, 1) / self.world}
        if self.grad_cache is not None:  # train.chunk_size: pass 1 of the gradient-cached step
            cached = self.grad_cache.forward(batch, sizes, normalizers, masked, classified)
            losses, total = cached.losses, cached.total
        else:
            outputs = self.model(batch)
            if self.cfg.loss.global_batch and any(n in self.names for n in ("sdm", "itc", "cmpm")):
                columns = gather_columns(outputs["image_feats"], outputs["text_feats"], batch["pids"], sizes)
            losses = irra_losses(outputs, batch, self.names, self.cfg.model.temperature, self.weights,
                                 columns=columns, normalizers=normalizers)
            total = torch.stack(list(losses.values())).sum()
        # The one per-step host sync of the loop: every rank must agree on skipping.
        bad = all_reduce_sum((~torch.isfinite(total.detach())).float()).item() > 0
        if bad:
            self.state.nonfinite_steps += 1
            self.consecutive_nonfinite += 1
            if self.accum > 1:
                self.discard_group = True
                if not self.is_deepspeed:
                    # Not optimizer.zero_grad(): Accelerate skips it before the last micro-batch of a group.
                    self.model.zero_grad(set_to_none=True)
            logger.warning("non-finite loss at %s: step skipped (%d in a row)", where,
                           self.consecutive_nonfinite)
            if self.consecutive_nonfinite >= self.cfg.train.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.consecutive_nonfinite} consecutive steps had a non-finite loss (last at "
                    f"{where}); training stopped and the last good checkpoint is "
                    f"{self.run_dir}/checkpoints/last: lower optim.lr, set optim.grad_clip, or use "
                    "train.mixed_precision=no, then --resume")
            return
        self.consecutive_nonfinite = 0
        # A short last group is scaled up so that the step is the mean over its micro-batches.
        if self.grad_cache is not None:
            self.grad_cache.backward(cached, self.accum / group_size)
        else:
            self.acc.backward(total * (self.accum / group_size) if group_size != self.accum else total)
        if self.acc.sync_gradients and self.cfg.optim.grad_clip > 0 and not self.is_deepspeed:
            self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        accs = cached.accs if self.grad_cache is not None else irra_accuracies(outputs, batch)
        for s in stats:
            s.add(losses, total, accs, rows, masked, global_rows)

    def _log_window(self, epoch: int, step_in_epoch: int, window: _Stats, epoch_stats: _Stats,
                    window_start: float) -> None:
        now = time.perf_counter()
        values = window.reduce(self.loader.skipped)
        running = epoch_stats.reduce(self.loader.skipped)
        speed = window.samples / max(now - window_start, 1e-9)
        window.reset()
        if values.pop("micro_batches") == 0:
            return  # every step of the window was skipped as non-finite: nothing to report
        # Official style: epoch-running averages, only the meters that are in use (> 0).
        parts = [f"{k}: {running[k]:.4f}" for k in ["loss", *self.loss_keys, *ACC_NAMES]
                 if running.get(k, 0) > 0]
        logger.info("Epoch[%d] Iteration[%d/%d], %s, Base Lr: %.2e", epoch, step_in_epoch,
                    self.steps_per_epoch, ", ".join(parts), self.base_lr())
        row = {"kind": "train", "epoch": epoch, "step": self.state.step, **values, "lr": self.base_lr(),
               "samples_per_s": speed, "nonfinite_steps": self.state.nonfinite_steps}
        self.metrics.write(row)
        self.acc.log({f"train/{k}": v for k, v in row.items() if k not in ("kind", "step")}
                     | {"train/global_batch": self.cfg.train.batch_size * self.world * self.accum},
                     step=self.state.step)

    def _draw_examples(self, split: str, png: Path) -> Callable[..., None]:
        """The evaluation hook that draws a few fixed queries of `split` and their top-5 into `png`."""

        def draw(g_feats, g_pids, g_index, q_feats, q_index) -> None:
            if is_remote(self.cfg.eval_shards()):
                return  # the picture reads images from a local shard folder
            try:
                if split not in self.examples:
                    self.examples[split] = RetrievalExamples(self.cfg.eval_shards(), split)
                drawn = self.examples[split].save(png, g_feats, g_pids, g_index, q_feats, q_index)
            except (OSError, ValueError) as err:  # a picture must never stop training
                logger.warning("could not draw the retrieval examples: %s", err)
                return
            if drawn is not None:
                self.examples_png = drawn

        return draw

    def _evaluate_split(self, split: str, loaders: tuple[Any, Any], png_name: str,
                        logged: dict[str, Any]) -> dict:
        """Evaluate one split and draw its retrieval grid; adds the grid to `logged` (W&B ``<split>/...``)."""
        self.examples_png = None
        draw = self._draw_examples(split, self.run_dir / "retrieval" / png_name)
        metrics = evaluate_retrieval(self.acc, self.model, *loaders, self.cfg.eval, on_features=draw)
        if self.examples_png is not None:
            logger.info("retrieval examples: %s", self.examples_png)
            if self.cfg.logging.wandb:
                import wandb

                logged[f"{split}/retrieval_examples"] = wandb.Image(str(self.examples_png))
        return metrics

    def evaluate(self, epoch: int) -> bool:
        """Evaluate the selecting split (and the tracked ones), log tables and metrics; True when the
        selecting split's t2i R1 improved on the best so far."""
        improved = False
        logged: dict[str, Any] = {}
        picture = None
        for split, loaders in self.eval_sets.items():
            selects = split == self.cfg.eval.split
            png_name = f"epoch_{epoch:03d}.png" if selects else f"{split}_epoch_{epoch:03d}.png"
            metrics = self._evaluate_split(split, loaders, png_name, logged)
            logger.info("Validation Results - Epoch: %d (%s split%s)\n%s", epoch, split,
                        "" if selects else ", recorded, not used for selection",
                        format_metrics_table(metrics))
            self.metrics.write({"kind": "eval", "epoch": epoch, "step": self.state.step, "split": split,
                                "selects": selects, "metrics": metrics})
            logged |= flat_metrics(metrics, prefix=split)
            if selects:
                picture = self.examples_png
                self.last_metrics = metrics
                improved = metrics["t2i"]["R1"] > self.state.best_r1
                if improved:
                    self.state.best_r1, self.state.best_epoch = metrics["t2i"]["R1"], epoch
                logged[f"{split}/best_t2i_R1"] = self.state.best_r1
        self.examples_png = picture
        logger.info("best R1: %.3f at epoch %d (%s split)", self.state.best_r1, self.state.best_epoch,
                    self.cfg.eval.split)
        self.acc.log(logged, step=self.state.step)
        return improved

    def final_test(self) -> None:
        """A run that selects on val touches the test split here, once training is complete: on the last
        weights and on `best` (one evaluation when they are the same epoch). Recorded as ``final`` rows."""
        cfg = self.cfg
        if not self.eval_sets or cfg.eval.split == "test" or not cfg.eval.final_test:
            return
        if self.state.best_epoch <= 0:
            logger.warning("no evaluation ran, so no best checkpoint exists: the final test evaluation is "
                           "skipped")
            return
        loaders = self._eval_loaders("test")
        last_epoch, best_epoch = cfg.train.num_epochs, self.state.best_epoch
        logged: dict[str, Any] = {}
        plan = [("last", last_epoch)] if best_epoch != last_epoch else []
        plan.append(("best", best_epoch))
        for weights, epoch in plan:
            if weights == "best" and best_epoch != last_epoch:
                best = self.run_dir / CHECKPOINTS_DIR / "best"
                logger.info("loading the best checkpoint (epoch %d, selected on %s) for the test split",
                            epoch, cfg.eval.split)
                load_checkpoint(self.acc, resolve_checkpoint(best))
            metrics = self._evaluate_split("test", loaders, f"test_{weights}.png", logged)
            names = ["best", "last"] if best_epoch == last_epoch else [weights]
            for name in names:
                logger.info("Test Results - %s weights (epoch %d, selected on %s)\n%s", name, epoch,
                            cfg.eval.split, format_metrics_table(metrics))
                self.metrics.write({"kind": "final", "epoch": epoch, "step": self.state.step, "split": "test",
                                    "weights": name, "selected_on": cfg.eval.split, "metrics": metrics})
        self.acc.log(logged, step=self.state.step)

    def _finish(self) -> None:
        """Once per completed run: the final test evaluation, a ``complete`` row, and the selection rules'
        test metrics (console, W&B keys ``<rule>/test_t2i_*`` and a ``results`` table)."""
        done = [False]
        if self.acc.is_main_process and self.metrics.path.is_file():
            done = [any(row.get("kind") == "complete" for row in read_metrics(self.metrics.path))]
        if broadcast_object_list(done)[0]:
            return
        self.final_test()
        self.metrics.write({"kind": "complete", "epoch": self.cfg.train.num_epochs, "step": self.state.step})
        if not self.acc.is_main_process:
            return
        self.results = select_results(read_metrics(self.metrics.path))
        logged: dict[str, Any] = {}
        for rule, result in self.results.items():
            logged[f"{rule}/epoch"] = result["epoch"]
            logged |= {f"{rule}/test_t2i_{name}": value for name, value in result["metrics"].items()}
        if self.cfg.logging.wandb and self.results:
            import wandb

            columns = ["rule", "epoch", *next(iter(self.results.values()))["metrics"]]
            logged["results/test_t2i"] = wandb.Table(columns=columns, data=[
                [RULE_TITLES[rule], r["epoch"], *r["metrics"].values()] for rule, r in self.results.items()])
        self.acc.log(logged, step=self.state.step)

    def _log_source_shares(self, epoch: int) -> None:
        """Each mixture source's samples in this epoch (console, metrics.jsonl, W&B ``data/share_<name>``)."""
        counts = self.loader.source_counts(epoch)
        total = max(sum(counts.values()), 1)
        logger.info("epoch %d draws %s", epoch, ", ".join(
            f"{n} samples ({100 * n / total:.1f}%) from {name}" for name, n in counts.items()))
        self.metrics.write({"kind": "sources", "epoch": epoch, "step": self.state.step, "samples": counts})
        self.acc.log({f"data/share_{name}": n / total for name, n in counts.items()}, step=self.state.step)

    def train_epoch(self, epoch: int) -> bool:
        """Run (the rest of) one epoch; False when train.max_steps stopped it early."""
        cfg = self.cfg
        n_batches = self.loader.num_batches(epoch)
        if cfg.data.sources and self.state.batch_in_epoch == 0:  # a resumed epoch has its row already
            self._log_source_shares(epoch)
        self.model.train()
        self.acc.step = 0  # accumulation groups start at the beginning of each epoch
        window = _Stats(self.loss_keys, self.device)
        epoch_stats = _Stats(self.loss_keys, self.device)
        start_time = window_start = time.perf_counter()
        done_batches = 0
        for b, batch in self._batches(epoch):
            group_start = (b // self.accum) * self.accum
            group_size = min(self.accum, n_batches - group_start)
            if b == n_batches - 1:
                # Close a short last group: Accelerate syncs when its counter reaches a multiple of accum.
                self.acc.step = self.accum - 1
            where = f"epoch {epoch}, batch {b + 1}/{n_batches}"
            with self.acc.accumulate(self.model):
                self._micro_step(batch, group_size, (window, epoch_stats), where)
            done_batches += 1
            if not self.acc.sync_gradients:
                continue
            self.discard_group = False
            self.state.step += 1
            self.state.batch_in_epoch = b + 1
            if cfg.optim.step_per == "step":
                self.scheduler.step()
            step_in_epoch = math.ceil((b + 1) / self.accum)
            if step_in_epoch % cfg.train.log_period == 0 or b == n_batches - 1:
                self._log_window(epoch, step_in_epoch, window, epoch_stats, window_start)
                window_start = time.perf_counter()
            if cfg.train.max_steps and self.state.step >= cfg.train.max_steps:
                logger.info("reached train.max_steps=%d at epoch %d", cfg.train.max_steps, epoch)
                self.save(("last",))
                self.export(WEIGHTS_FILE)
                return False
            every = cfg.train.checkpoint_every_steps
            # Not during a run of non-finite losses: `last` stays at the last step that trained.
            due = every and self.state.step % every == 0 and b != n_batches - 1
            if due and not self.consecutive_nonfinite:
                self.save(("last",))
        elapsed = time.perf_counter() - start_time
        logger.info("Epoch %d done. Time per batch: %.3f[s] Speed: %.1f[samples/s]", epoch,
                    elapsed / max(done_batches, 1), epoch_stats.samples / max(elapsed, 1e-9))
        return True

    # ---------------------------------------------------------------------------------------------

    def _log_header(self) -> None:
        cfg, acc = self.cfg, self.acc
        logger.info("run folder: %s", self.run_dir)
        logger.info("%s", config_summary(cfg, self.run_dir / CONFIG_FILE))
        threads = f", {torch.get_num_threads()} CPU threads each" if self.device.type == "cpu" else ""
        logger.info("Using %d processes (%s, mixed precision %s%s)", self.world, acc.distributed_type.value,
                    acc.mixed_precision, threads)
        logger.info("global batch: %d per device x %d processes x %d accumulation steps = %d",
                    cfg.train.batch_size, self.world, self.accum,
                    cfg.train.batch_size * self.world * self.accum)
        logger.info("Total params: %2.fM", self.num_params / 1e6)
        logger.info("%d training samples of %d identities: %d optimizer steps per epoch",
                    self.loader.num_samples, self.loader.num_train_ids, self.steps_per_epoch)
        if self.gallery is not None:
            official = " (as the official code and the paper did)" if cfg.eval.split == "test" else ""
            logger.info("evaluating every %d epochs on the %s split; the best checkpoint is chosen by t2i R1 "
                        "on that split%s", cfg.eval.eval_period, cfg.eval.split, official)
            for split in cfg.eval.track_splits:
                if split in self.eval_sets:
                    logger.info("the %s split is evaluated at the same epochs and recorded, not used for "
                                "selection", split)
                else:
                    logger.info("eval.track_splits names %s, but %s has no %s images: not recorded", split,
                                cfg.eval_shards(), split)
            if cfg.eval.split != "test" and cfg.eval.final_test:
                logger.info("the test split is evaluated once, after the last epoch, on the best and the "
                            "last weights")

    def run(self, checkpoint: Path | None) -> None:
        """Train from the start or from `checkpoint` to the last epoch (or train.max_steps)."""
        cfg = self.cfg
        global_batch = cfg.train.batch_size * self.world
        if checkpoint is not None:
            self.resume_from(checkpoint)
            if self.state.batch_in_epoch and self.state.global_batch_size != global_batch:
                raise ConfigError(f"the checkpoint stopped mid-epoch with a global micro-batch of "
                                  f"{self.state.global_batch_size} samples, this run has {global_batch}: "
                                  "resume with the same train.batch_size x processes")
        else:
            self.state.wandb_run_id = broadcast_object_list([new_run_id()])[0]
            self._write_run_row()
        self.state.global_batch_size = global_batch
        if self.acc.is_main_process:
            save_config(cfg, self.run_dir / CONFIG_FILE)
        if cfg.logging.wandb:
            init_wandb(self.acc, cfg.logging, run_dir=self.run_dir, run_name=self.run_dir.name,
                       run_id=self.state.wandb_run_id, config=cfg.to_dict())
        self._log_header()
        for epoch in range(self.state.epoch, cfg.train.num_epochs + 1):
            if cfg.train.max_steps and self.state.step >= cfg.train.max_steps:
                logger.info("train.max_steps=%d already reached", cfg.train.max_steps)
                return
            if not self.train_epoch(epoch):
                return
            if cfg.optim.step_per == "epoch":
                self.scheduler.step()
            self.state.epoch, self.state.batch_in_epoch = epoch + 1, 0
            improved = False
            if self.gallery is not None and epoch % cfg.eval.eval_period == 0:
                improved = self.evaluate(epoch)
            self.save(("last", "best") if improved else ("last",))
            self.export(WEIGHTS_FILE)
            if improved:
                self.export(BEST_WEIGHTS_FILE)
        if self.state.epoch > cfg.train.num_epochs:
            self._finish()
            logger.info("training complete: %d epochs, %d steps, %d non-finite steps skipped; best %s R1 "
                        "%.3f at epoch %d", cfg.train.num_epochs, self.state.step, self.state.nonfinite_steps,
                        cfg.eval.split, self.state.best_r1, self.state.best_epoch)
            self.completed = True  # train() prints the summary once W&B has said its last words

    def _write_run_row(self) -> None:
        """The first row of metrics.jsonl: what this run is, for irra-report (recipe, dataset, protocol)."""
        manifest = eval_manifest(self.cfg, self.loader)
        self.metrics.write({
            "kind": "run", "step": 0, "recipe": self.cfg.name, "dataset": manifest.get("dataset"),
            "annotation_sha256": manifest.get("annotation_sha256"),
            "val_from_train": manifest.get("val_from_train"), "shards": str(self.cfg.eval_shards()),
            "sources": [dataclasses.asdict(s) for s in self.cfg.data.sources] or None,
            "seed": self.cfg.train.seed, "num_epochs": self.cfg.train.num_epochs,
            "selection_split": self.cfg.eval.split, "track_splits": list(self.cfg.eval.track_splits),
            "final_test": self.cfg.eval.final_test and self.cfg.eval.split != "test",
            "group": self.cfg.logging.group})

    def _log_summary(self) -> None:
        """The last lines a user reads: test metrics per selection rule, the run folder, a picture to open."""
        if self.results:
            rows = {f"t2i {RULE_TITLES[rule]} @{r['epoch']}": r["metrics"]
                    for rule, r in self.results.items()}
            logger.info("test split, by selection rule (epoch after @):\n%s", format_metrics_table(rows))
        elif self.last_metrics is not None:
            logger.info("final %s metrics (epoch %d):\n%s", self.cfg.eval.split, self.cfg.train.num_epochs,
                        format_metrics_table(self.last_metrics))
        logger.info("run folder: %s", self.run_dir.resolve())
        if self.examples_png is not None:
            logger.info("retrieval picture: %s", self.examples_png.resolve())


def config_summary(cfg: Config, config_file: Path) -> str:
    """Three lines on what this run trains, instead of the whole config (in `config_file` and in W&B)."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    model = f"CLIP {m.pretrained}" if m.pretrained.lower() != "none" else (
        f"random-init CLIP ({m.vision_layers}x{m.vision_width} vision, {m.text_layers}x{m.text_width} text)")
    return (f"recipe {cfg.name}: {model}, input {m.image_size[0]}x{m.image_size[1]}, losses "
            f"{'+'.join(cfg.loss.names)}; data {cfg.data.shards}\n"
            f"  {t.num_epochs} epochs, {o.optimizer} lr {o.lr:g} ({o.scheduler}, {o.warmup_epochs} warm-up "
            f"epochs), precision {t.mixed_precision}, seed {t.seed}\n"
            f"  full config: {config_file}")


def _end_tracking(accelerator: Accelerator, cfg: Config) -> bool:
    """Finish the trackers (W&B writes or uploads everything and prints its closing lines); True.

    Not ``accelerator.end_training()``: that also destroys the process group, which the teardown in
    :func:`train` still needs for its barrier.
    """
    for tracker in accelerator.trackers:
        tracker.finish()
    if cfg.logging.wandb and accelerator.is_main_process:
        finish_wandb()
    return True


def _interrupted(claim: RunFolderClaim | None) -> TrainingInterrupted:
    """What Ctrl-C leaves: the run folder and its last complete checkpoint (``checkpoints/last``)."""
    if claim is None:
        return TrainingInterrupted(None, None)
    last = claim.run_dir / CHECKPOINTS_DIR / "last"
    return TrainingInterrupted(claim.run_dir, last.resolve() if last.exists() else None)


def train(cfg: Config, *, resume: str | os.PathLike | None = None) -> Path:
    """Train IRRA as `cfg` says, under whatever ``accelerate launch`` started (or a single process).

    Args:
        cfg: the run config.
        resume: ``"latest"`` or a run folder / checkpoint to continue (model, optimizer, scheduler, RNG,
            epoch and position in it, best R1, W&B run).

    Returns:
        The run folder (``train.output_dir/<run name>``), holding config.yaml, train_log.txt, metrics.jsonl,
        checkpoints/, model.safetensors and (with evaluation) best.safetensors.

    Raises:
        ConfigError, CheckpointError, ShardError: bad input (one-line messages).
        NonFiniteLossError: too many consecutive non-finite losses.
        PeerFailure: another rank failed first (this rank's own error is not worth reporting).
    """
    checkpoint = resolve_resume(cfg, resume)
    cfg = absolute_locations(cfg)  # the run works from any directory (docs/TRAINING.md)
    require_differentiable_gather()
    accelerator = build_accelerator(cfg, log_with="wandb" if cfg.logging.wandb else None)
    claim: RunFolderClaim | None = None
    failed = completed = tracking_ended = False
    try:
        with PeerFailureWatch(cfg.train.peer_failure_timeout_s), \
                run_logging(is_main=accelerator.is_main_process, rank=accelerator.process_index) as logs:
            ensure_shards(accelerator, cfg)
            # Built before the run folder, so that bad data leaves no empty run behind.
            loader = build_train_loader(cfg, accelerator)
            keep_id, why = id_loss_scope(cfg, loader)
            if why is not None:
                logger.info("%s", why)
            if "id" in cfg.loss.names and not keep_id:
                cfg = dataclasses.replace(cfg, loss=dataclasses.replace(
                    cfg.loss, names=[n for n in cfg.loss.names if n != "id"]))
            if cfg.eval.eval_period > 0:
                # A missing val split stops here, before the run folder exists.
                evaluation_splits(cfg, eval_manifest(cfg, loader))
            run_dir = run_dir_of(checkpoint) if checkpoint is not None else _new_run_dir(accelerator, cfg)
            # Built before the run folder is claimed: model, optimizer, schedule and evaluation data that
            # cannot be set up fail here, with nothing written.
            trainer = Trainer(cfg, accelerator, run_dir, loader)
            claim = _claim_on_main(accelerator, run_dir, new=checkpoint is None)
            logs.add_file(run_dir / LOG_FILE)
            # Log lines go around the progress bar instead of through it.
            with logging_redirect_tqdm(loggers=[logs.logger]):
                trainer.run(checkpoint)
            completed = True
            tracking_ended = _end_tracking(accelerator, cfg)
            if trainer.completed:
                trainer._log_summary()  # the last lines a user reads, after W&B's own
    except KeyboardInterrupt:
        if claim is not None:
            claim.discard_unused()
        raise _interrupted(claim) from None
    except Exception as err:
        failed = True
        if claim is not None:
            claim.discard_unused()  # a start that failed before its first checkpoint leaves no folder
        # Told before any teardown, so that the other ranks stop instead of waiting in a collective.
        if not announce(f"{type(err).__name__}: {err}"):
            raise PeerFailure(f"rank {accelerator.process_index} stopped after another rank failed") from None
        raise
    except BaseException:
        if claim is not None:
            claim.discard_unused()
        raise
    finally:
        if claim is not None:
            claim.release()
        if failed and accelerator.num_processes > 1:
            # No collective teardown: the other ranks are gone or about to be (the caller exits at once).
            if cfg.logging.wandb and accelerator.is_main_process and not tracking_ended:
                finish_wandb()
        else:
            if completed and accelerator.num_processes > 1:
                # Every rank has stopped watching the store before any rank tears it down.
                accelerator.wait_for_everyone()
            if not tracking_ended:
                _end_tracking(accelerator, cfg)
            accelerator.state.destroy_process_group()  # what end_training does besides the trackers
            # ZeRO-3 processes abort at exit unless the group is torn down explicitly.
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
    return run_dir

