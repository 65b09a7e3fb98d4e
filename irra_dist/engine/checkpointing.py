"""Training checkpoints: atomic saves, safe loads, ``last`` / ``best`` links, exported weights.

Layout of a run folder's ``checkpoints/``::

    state-00000120-3f9a1c/      one complete checkpoint (never modified after it is complete)
        model.safetensors, optimizer.bin, ...   Accelerate's save_state (or DeepSpeed's files)
        random_states_<rank>.pkl                every rank's RNG states (Accelerate's save_state)
        trainer_state.json                      epoch, position in the epoch, step, best R1, scheduler
        files.json                              every file's size and SHA-256, written last: marks the
                                                save complete; checked on every rank at resume
    last -> state-00000120-3f9a1c               symbolic links, replaced atomically
    best -> state-00000100-0b77d2

A save writes into ``.saving/`` and renames it to ``state-*`` only when every rank is done, then swaps the
links; a crash at any point leaves the previous ``last`` and ``best`` untouched. Directories no link points
to are removed afterwards.

Loading runs no pickled code for Accelerate checkpoints: the model is safetensors, the optimizer and the
RNG states (Python, NumPy, torch CPU and every CUDA device) go through Accelerate's
``torch.load(weights_only=True)``, and the trainer state is JSON. Accelerate only logs when it cannot restore
the RNG states; here every file is hash-checked before loading, and a rank without a file (a resume with more
processes) is warned about. DeepSpeed's own checkpoint files are read by DeepSpeed with
``torch.load(weights_only=False)``: only resume DeepSpeed runs from checkpoints you wrote yourself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import RNG_STATE_NAME, DistributedType
from torch import nn

from irra_dist.engine.accel import unwrap, zero_stage
from irra_dist.fileio import file_sha256
from irra_dist.model import CheckpointError, save_weights_safetensors
from irra_dist.model.weights import CHECKPOINTS_DIR, FILES_FILE

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
RNG_FILE = f"{RNG_STATE_NAME}_{{rank}}.pkl"
"""Accelerate's RNG file of one rank, written by save_state and restored by load_state."""
SAVING_DIR = ".saving"
LINK_NAMES = ("last", "best")
_STATE_PREFIX = "state-"


@dataclass
class TrainerState:
    """Where a run stands; saved with every checkpoint as JSON."""

    epoch: int = 1
    """The epoch to run (1-based); equals num_epochs + 1 when training is complete."""
    batch_in_epoch: int = 0
    """Global micro-batches of `epoch` already trained (the loader's start_batch on resume)."""
    step: int = 0
    """Optimizer steps taken so far (skipped non-finite steps included)."""
    best_r1: float = -1.0
    """Best text-to-image R1 so far (-1: no evaluation yet)."""
    best_epoch: int = 0
    nonfinite_steps: int = 0
    """Micro-batches skipped so far because their loss was not finite."""
    global_batch_size: int = 0
    """Samples per global micro-batch (batch_size x processes) of the run that saved it."""
    wandb_run_id: str = ""
    """W&B run id, so a resumed run continues the same W&B run."""
    scheduler: dict[str, Any] = field(default_factory=dict)
    """The LR scheduler's state_dict."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, source: Path) -> TrainerState:
        """Parse a saved state; unknown or missing keys are a CheckpointError."""
        try:
            data = json.loads(text)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as err:
            raise CheckpointError(f"{source} is not a valid trainer state ({err}): resume from another "
                                  "checkpoint") from None


# --------------------------------------------------------------------------------------------------
# Saving


def full_parameters(accelerator: Accelerator, module: nn.Module) -> AbstractContextManager[Any]:
    """A context in which `module` holds all its parameters: gathers them under ZeRO-3, else a no-op."""
    if zero_stage(accelerator) == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    return nullcontext()


def _file_listing(accelerator: Accelerator, folder: Path) -> dict[str, dict[str, Any]]:
    """Every file's size and SHA-256, hashed right after the save (the bytes are still in the page cache),
    the files shared out among the ranks; the complete listing on the main process."""
    names = [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file()]
    mine = names[accelerator.process_index::accelerator.num_processes]
    listing = {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
               for name in mine}
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        listing = {k: v for part in gather_object([listing]) for k, v in part.items()}
    return {name: listing[name] for name in names}


def _point_link(link: Path, target_name: str) -> None:
    """Make `link` a relative symlink to `target_name` atomically (a new link renamed over the old one)."""
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:6]}.tmp")
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


def _prune(root: Path) -> None:
    """Remove checkpoint folders that no link points to."""
    keep = {os.readlink(root / name) for name in LINK_NAMES if (root / name).is_symlink()}
    for child in root.iterdir():
        if child.name.startswith(_STATE_PREFIX) and child.is_dir() and child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainerState,
                    links: Sequence[str] = ("last",)) -> Path:
    """Save model, optimizer, RNG and trainer state; point `links` at the new checkpoint. All ranks call it.

    Args:
        accelerator: the run's Accelerator (its prepared model and optimizer are saved).
        run_dir: the run folder; checkpoints go to ``run_dir/checkpoints``.
        state: the trainer state to store.
        links: which of ``last`` / ``best`` to point at this checkpoint.

    Returns:
        The new checkpoint folder.
    """
    root = run_dir / CHECKPOINTS_DIR
    staging = root / SAVING_DIR
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # DeepSpeed needs every rank in save_state (each writes its own optimizer partition).
    accelerator.save_state(str(staging))
    if accelerator.is_main_process:
        (staging / STATE_FILE).write_text(state.to_json())
    accelerator.wait_for_everyone()
    listing = _file_listing(accelerator, staging)
    final = root / f"{_STATE_PREFIX}{state.step:08d}-{uuid.uuid4().hex[:6]}"
    if accelerator.is_main_process:
        # Written last, after every rank finished: its presence marks a complete checkpoint.
        (staging / FILES_FILE).write_text(json.dumps(listing, indent=1))
        os.rename(staging, final)
        for name in links:
            _point_link(root / name, final.name)
        _prune(root)
        logger.info("saved checkpoint %s (%s)", final.relative_to(run_dir), ", ".join(links))
    accelerator.wait_for_everyone()
    return final


def fp32_master_weights(accelerator: Accelerator, module: nn.Module) -> dict[int, torch.Tensor] | None:
    """The optimizer's fp32 copy of every parameter when DeepSpeed keeps the module in fp16/bf16, by
    ``id(parameter)``; None otherwise (the module's own weights are then the fp32 ones). All ranks call it
    (the copies are partitioned across ranks under ZeRO)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    params = list(module.parameters())
    if not params or params[0].dtype not in (torch.float16, torch.bfloat16):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {id(p): safe_get_full_fp32_param(p) for p in params}
    return None if any(m is None for m in masters.values()) else masters


def export_weights(accelerator: Accelerator, model: nn.Module, path: Path,
                   metadata: dict[str, str] | None = None) -> None:
    """Write the model's weights as ``path`` (safetensors, official key names, no ``module.``), in fp32.

    Under DeepSpeed with fp16/bf16 the module itself holds half-precision weights; the file gets the
    optimizer's fp32 master weights instead. All ranks call it (ZeRO gathers the parameters and their
    masters); the main process writes, atomically.
    """
    unwrapped = unwrap(accelerator, model)
    masters = fp32_master_weights(accelerator, unwrapped)
    with full_parameters(accelerator, unwrapped):
        if accelerator.is_main_process:
            params = dict(unwrapped.named_parameters(remove_duplicate=False))
            state = {key: masters[id(params[key])] if masters is not None and key in params else value
                     for key, value in unwrapped.state_dict().items()}
            state = {key: value.float() if value.is_floating_point() else value
                     for key, value in state.items()}
            save_weights_safetensors(unwrapped, path, metadata, state_dict=state)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------------
# Finding and loading


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint folder, a ``last``/``best`` link, a checkpoints/ or a run folder.

    Raises:
        CheckpointError: nothing resumable at `path`.
    """
    path = Path(path)
    for candidate in (path, path / "last", path / CHECKPOINTS_DIR / "last"):
        if (candidate / STATE_FILE).is_file() or (candidate / FILES_FILE).is_file():
            return candidate.resolve()
    raise CheckpointError(f"no checkpoint at {path}: pass a run folder (with checkpoints/last), a "
                          "checkpoints/last or checkpoints/best link, or a checkpoint folder")


def run_dir_of(checkpoint: Path) -> Path:
    """The run folder a resolved checkpoint folder belongs to (``<run>/checkpoints/state-*``)."""
    return checkpoint.parent.parent


def find_latest_run(output_dir: str | os.PathLike) -> Path | None:
    """The run folder under `output_dir` whose ``checkpoints/last`` is the most recent, or None."""
    best: tuple[float, Path] | None = None
    root = Path(output_dir)
    if not root.is_dir():
        return None
    for run in root.iterdir():
        last = run / CHECKPOINTS_DIR / "last"
        if last.is_symlink() and (last / FILES_FILE).is_file():
            mtime = (last / FILES_FILE).stat().st_mtime
            if best is None or mtime > best[0]:
                best = (mtime, run)
    return None if best is None else best[1]


def verify_checkpoint(checkpoint: Path) -> TrainerState:
    """Check that every file of the checkpoint is present with its recorded size and SHA-256 (checkpoints
    written before hashes were recorded: size only); return its trainer state.

    Raises:
        CheckpointError: an incomplete, truncated or damaged checkpoint (one line naming the file).
    """
    listing = checkpoint / FILES_FILE
    if not listing.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} is incomplete (no {FILES_FILE}; the save was "
                              "interrupted): resume from another checkpoint")
    try:
        sizes = json.loads(listing.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {checkpoint} has a damaged {FILES_FILE}: resume from another "
                              "checkpoint") from None
    for name, entry in sizes.items():
        file = checkpoint / name
        size, digest = (entry, None) if isinstance(entry, int) else (entry.get("size"), entry.get("sha256"))
        if not file.is_file():
            raise CheckpointError(f"checkpoint {checkpoint} is missing {name}: resume from another "
                                  "checkpoint")
        if file.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {file} has {file.stat().st_size} bytes, {size} were "
                                  "written (truncated or damaged): resume from another checkpoint")
        if digest is not None and file_sha256(file) != digest:
            raise CheckpointError(f"checkpoint file {file} is damaged (its SHA-256 differs from the one "
                                  "recorded when it was saved): resume from another checkpoint")
    return TrainerState.from_json((checkpoint / STATE_FILE).read_text(), checkpoint / STATE_FILE)


def _verify_on_every_rank(accelerator: Accelerator, checkpoint: Path) -> TrainerState:
    """:func:`verify_checkpoint` on every rank (each reads the files it will load, which need not be the same
    copy on every machine); if any rank finds damage, all ranks raise its message."""
    state, problem = None, None
    try:
        state = verify_checkpoint(checkpoint)
    except CheckpointError as err:
        problem = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        problems = [p for p in gather_object([problem]) if p is not None]
        problem = problems[0] if problems else None
    if problem is not None:
        raise CheckpointError(problem)
    return state


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> TrainerState:
    """Restore model, optimizer and RNG states from `checkpoint` into the prepared objects. All ranks call it.

    Returns:
        The saved trainer state (the caller restores the scheduler from it).

    Raises:
        CheckpointError: an incomplete, truncated or unreadable checkpoint.
    """
    state = _verify_on_every_rank(accelerator, checkpoint)
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as err:  # noqa: BLE001 - any failure inside the loaders means a bad checkpoint
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load checkpoint {checkpoint}: {first[:200]} (was it written by a "
                              "run with the same model and launcher config?)") from None
    if not (checkpoint / RNG_FILE.format(rank=accelerator.process_index)).is_file():
        logger.warning("checkpoint %s has no RNG state for rank %d (saved with fewer processes); this rank "
                       "keeps its seeded state", checkpoint, accelerator.process_index)
    return state
