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
from irra_dist.data.pipeline import TrainLoader, build_eval_loaders
from irra_dist.data.shards import MANIFEST_NAME
from irra_dist.data.sources import is_remote
from irra_dist.data.streaming import StreamTrainLoader
from irra_dist.distributed import all_reduce_sum, gather_columns
from irra_dist.engine.accel import build_accelerator
from irra_dist.engine.checkpointing import (
    TrainerState,
    export_weights,
    find_latest_run,
    load_checkpoint,
    resolve_checkpoint,
    run_dir_of,
    save_checkpoint,
)
from irra_dist.engine.evaluate import evaluate_retrieval, flat_metrics, show_progress
from irra_dist.engine.runlog import (
    BEST_WEIGHTS_FILE,
    CONFIG_FILE,
    LOG_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    MetricsWriter,
    run_logging,
)
from irra_dist.engine.tracking import finish_wandb, init_wandb, new_run_id
from irra_dist.evaluation.metrics import format_metrics_table
from irra_dist.losses import irra_accuracies, irra_losses
from irra_dist.model import CheckpointError, build_irra_from_config
from irra_dist.optim import build_lr_scheduler, build_optimizer
from irra_dist.search import RetrievalExamples

logger = logging.getLogger(__name__)

ACC_NAMES = ("img_acc", "txt_acc", "mlm_acc")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss; the message says what to change."""


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
    run_dir = Path(cfg.train.output_dir) / name[0]
    if (run_dir / CONFIG_FILE).exists():
        raise ConfigError(f"run folder {run_dir} already exists: resume it with --resume {run_dir}, or "
                          "choose another train.run_name")
    return run_dir


def build_demo_shards(shards_dir: Path, image_size: tuple[int, int]) -> None:
    """Generate the synthetic demo dataset and write its shards to `shards_dir` (raw images are dropped).

    Images are stored pre-resized to the training size as raw PPM, the fastest format to load
    (docs/BENCHMARKS.md), since the demo is bounded by the CPU.
    """
    import tempfile

    from irra_dist.data.shards import build_shards
    from irra_dist.data.synthetic import generate_synthetic_dataset

    shards_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=shards_dir.parent, prefix=f".{shards_dir.name}-raw-") as raw:
        workers = max(1, min(4, os.cpu_count() or 1))
        dataset = generate_synthetic_dataset(Path(raw) / "CUHK-PEDES", workers=workers)
        build_shards("CUHK-PEDES", dataset, shards_dir, pre_resize=tuple(image_size), pre_resize_format="ppm",
                     workers=workers, progress=False)


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
    if cfg.data.mode == "stream":
        return StreamTrainLoader(cfg.data.shards, shuffle_buffer=cfg.data.shuffle_buffer, **common)
    return TrainLoader(cfg.data.shards, sampler=cfg.data.sampler, num_instances=cfg.data.num_instances,
                       **common)


def ensure_shards(accelerator: Accelerator, cfg: Config) -> None:
    """Build the demo shards on the main process if the recipe asks for it and they are missing."""
    shards = Path(cfg.data.shards)
    if is_remote(cfg.data.shards) or (shards / MANIFEST_NAME).is_file() or not cfg.data.build_demo_if_missing:
        return  # a missing set is reported by the loader with a one-line ShardError
    if accelerator.is_main_process:
        logger.info("no shards in %s: generating the synthetic demo dataset and its shards", shards)
        build_demo_shards(shards, cfg.model.image_size)
    accelerator.wait_for_everyone()


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
        self.is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

        num_classes = loader.num_train_ids if "id" in self.names else 0
        # Same seed on every rank before building: identical initial weights everywhere.
        set_seed(cfg.train.seed)
        model = build_irra_from_config(cfg.model, num_classes, with_mlm="mlm" in self.names,
                                       mask_global_text=cfg.data.mask_global_text)
        self.num_params = sum(p.numel() for p in model.parameters())
        # On the device before the optimizer exists, so that it can pick fused CUDA kernels.
        optimizer = build_optimizer(model.to(self.device), cfg.optim)
        self.steps_per_epoch = math.ceil(len(loader) / self.accum)
        # The scheduler stays outside prepare(): Accelerate would step it once per process, and DeepSpeed
        # once per optimizer step; it is stepped here, per epoch or per step as the recipe says.
        self.scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.num_epochs, self.steps_per_epoch)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.gallery = self.queries = None
        self.examples: RetrievalExamples | None = None  # built on first use, main process only
        self.examples_png: Path | None = None
        self.last_metrics: dict | None = None
        if cfg.eval.eval_period > 0:
            self.gallery, self.queries = build_eval_loaders(
                cfg.data.shards, cfg.eval.split, rank=accelerator.process_index, world_size=self.world,
                batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers,
                image_size=tuple(cfg.model.image_size), pin_memory=self.device.type == "cuda",
                **_cache_args(cfg))

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
        """Forward, global-batch losses, and backward (or a skip when the loss is not finite anywhere)."""
        rows = int(batch["pids"].shape[0])
        masked = int((batch["mlm_labels"] != 0).sum()) if "mlm_labels" in batch else 0
        counts = self.exchange.gather([rows, masked])
        sizes = [c[0] for c in counts]
        global_rows, global_masked = sum(sizes), sum(c[1] for c in counts)
        batch = _to_device(batch, self.device)
        outputs = self.model(batch)
        columns, normalizers = None, None
        if self.cfg.loss.global_batch:
            if any(n in self.names for n in ("sdm", "itc", "cmpm")):
                columns = gather_columns(outputs["image_feats"], outputs["text_feats"], batch["pids"], sizes)
            normalizers = {"batch": max(global_rows, 1) / self.world,
                           "mlm": max(global_masked, 1) / self.world}
        losses = irra_losses(outputs, batch, self.names, self.cfg.model.temperature, self.weights,
                             columns=columns, normalizers=normalizers)
        total = torch.stack(list(losses.values())).sum()
        # The one per-step host sync of the loop: every rank must agree on skipping.
        bad = all_reduce_sum((~torch.isfinite(total.detach())).float()).item() > 0
        if bad:
            self.state.nonfinite_steps += 1
            self.consecutive_nonfinite += 1
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
        self.acc.backward(total * (self.accum / group_size) if group_size != self.accum else total)
        if self.acc.sync_gradients and self.cfg.optim.grad_clip > 0 and not self.is_deepspeed:
            self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        accs = irra_accuracies(outputs, batch)
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

    def _draw_examples(self, epoch: int) -> Callable[..., None]:
        """The evaluation hook that draws a few fixed queries' top-5 into retrieval/epoch_NNN.png."""

        def draw(g_feats, g_pids, g_index, q_feats, q_index) -> None:
            if is_remote(self.cfg.data.shards):
                return  # the picture reads images from a local shard folder
            try:
                if self.examples is None:
                    self.examples = RetrievalExamples(self.cfg.data.shards, self.cfg.eval.split)
                png = self.examples.save(self.run_dir / "retrieval" / f"epoch_{epoch:03d}.png",
                                         g_feats, g_pids, g_index, q_feats, q_index)
            except (OSError, ValueError) as err:  # a picture must never stop training
                logger.warning("could not draw the retrieval examples: %s", err)
                return
            if png is not None:
                self.examples_png = png

        return draw

    def evaluate(self, epoch: int) -> bool:
        """Evaluate, log the table and metrics; True when R1 improved on the best so far."""
        self.examples_png = None
        metrics = evaluate_retrieval(self.acc, self.model, self.gallery, self.queries, self.cfg.eval,
                                     on_features=self._draw_examples(epoch))
        self.last_metrics = metrics
        r1 = metrics["t2i"]["R1"]
        improved = r1 > self.state.best_r1
        if improved:
            self.state.best_r1, self.state.best_epoch = r1, epoch
        logger.info("Validation Results - Epoch: %d (%s split)\n%s", epoch, self.cfg.eval.split,
                    format_metrics_table(metrics))
        logger.info("best R1: %.3f at epoch %d", self.state.best_r1, self.state.best_epoch)
        self.metrics.write({"kind": "eval", "epoch": epoch, "step": self.state.step,
                            "split": self.cfg.eval.split, "metrics": metrics})
        logged = flat_metrics(metrics) | {"eval/best_R1": self.state.best_r1}
        if self.examples_png is not None:
            logger.info("retrieval examples: %s", self.examples_png)
            if self.cfg.logging.wandb:
                import wandb

                logged["eval/retrieval_examples"] = wandb.Image(str(self.examples_png))
        self.acc.log(logged, step=self.state.step)
        return improved

    def train_epoch(self, epoch: int) -> bool:
        """Run (the rest of) one epoch; False when train.max_steps stopped it early."""
        cfg = self.cfg
        n_batches = self.loader.num_batches(epoch)
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
        logger.info("config:\n%s", dump_config(cfg))
        logger.info("Using %d processes (%s, mixed precision %s)", self.world, acc.distributed_type.value,
                    acc.mixed_precision)
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
            logger.info("training complete: %d epochs, %d steps, %d non-finite steps skipped; best R1 %.3f "
                        "at epoch %d", cfg.train.num_epochs, self.state.step, self.state.nonfinite_steps,
                        self.state.best_r1, self.state.best_epoch)
            self._log_summary()

    def _log_summary(self) -> None:
        """The last lines a user reads: final metrics, where the run is, and a picture to open."""
        if self.last_metrics is not None:
            logger.info("final %s metrics (epoch %d):\n%s", self.cfg.eval.split, self.cfg.train.num_epochs,
                        format_metrics_table(self.last_metrics))
        logger.info("run folder: %s", self.run_dir.resolve())
        if self.examples_png is not None:
            logger.info("retrieval picture: %s", self.examples_png.resolve())


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
    """
    checkpoint = resolve_resume(cfg, resume)
    accelerator = build_accelerator(cfg, log_with="wandb" if cfg.logging.wandb else None)
    try:
        with run_logging(is_main=accelerator.is_main_process, rank=accelerator.process_index) as logs:
            ensure_shards(accelerator, cfg)
            # Built before the run folder, so that bad data leaves no empty run behind.
            loader = build_train_loader(cfg, accelerator)
            run_dir = run_dir_of(checkpoint) if checkpoint is not None else _new_run_dir(accelerator, cfg)
            if accelerator.is_main_process:
                run_dir.mkdir(parents=True, exist_ok=True)
                logs.add_file(run_dir / LOG_FILE)
            accelerator.wait_for_everyone()
            # Log lines go around the progress bar instead of through it.
            with logging_redirect_tqdm(loggers=[logs.logger]):
                Trainer(cfg, accelerator, run_dir, loader).run(checkpoint)
    finally:
        accelerator.end_training()
        if cfg.logging.wandb and accelerator.is_main_process:
            finish_wandb()
        # ZeRO-3 processes abort at exit unless the group is torn down explicitly.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return run_dir

