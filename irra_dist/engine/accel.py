"""Building the Accelerator from a run config: precision, process group, accumulation, DeepSpeed settings.

The recipe is the single source of truth for what changes the numbers (precision, per-device batch,
accumulation, clipping); the launcher's config (``accelerate_configs/*.yaml``) only chooses how many
processes run and whether DeepSpeed does. Values the DeepSpeed JSON leaves at ``"auto"`` are filled from the
recipe here; an explicit value that disagrees with the recipe is an error rather than a silent override.
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, is_compiled_module

from irra_dist.config import Config, ConfigError
from irra_dist.engine.gradcache import check_chunking

logger = logging.getLogger(__name__)

PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)
"""Long enough for rank 0 to build the demo shards or evaluate a large split while the others wait."""


def resolve_mixed_precision(setting: str, *, cuda: bool | None = None, bf16: bool | None = None) -> str:
    """Map ``train.mixed_precision`` to Accelerate's value.

    Args:
        setting: ``"auto"``, ``"no"``, ``"fp16"`` or ``"bf16"``.
        cuda: whether a CUDA device is used (detected when None).
        bf16: whether that device supports bf16 (detected when None).

    Returns:
        ``"auto"`` becomes ``"bf16"`` on a GPU that supports it, ``"fp16"`` on other GPUs (Accelerate adds
        a gradient scaler) and ``"no"`` (fp32) without a GPU; other settings are returned unchanged.
    """
    if setting != "auto":
        return setting
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return "no"
    bf16 = torch.cuda.is_bf16_supported() if bf16 is None else bf16
    return "bf16" if bf16 else "fp16"


def deepspeed_requested() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config (it exports this variable)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def build_accelerator(cfg: Config, *, log_with: str | None = None) -> Accelerator:
    """Create the Accelerator for a training or evaluation run.

    Without CUDA the process group uses gloo. Plain multi-process runs are then put in Accelerate's CPU
    mode (otherwise Accelerate reports ``DistributedType.NO`` with two processes and never wraps the model in
    DDP); DeepSpeed runs keep DeepSpeed's own mode and only get the gloo backend.

    Args:
        cfg: the run config (precision, accumulation, compile).
        log_with: ``"wandb"`` to enable that tracker, None for none.

    Returns:
        The Accelerator, with the DeepSpeed plugin (if any) filled from the recipe.

    Raises:
        ConfigError: a DeepSpeed JSON value that contradicts the recipe.
    """
    cuda = torch.cuda.is_available()
    check_process_count(cuda)
    if deepspeed_requested():
        locate_deepspeed_json()
        # DeepSpeed's ZeRO collectives call torch.distributed functions that torch deprecates: a warning per
        # call site and process (~200 lines under ZeRO-3) that a user can do nothing about.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                                category=FutureWarning)
    # DDP's buffer broadcast is turned off per model (ddp_ignores_buffers), not with broadcast_buffers.
    handlers: list[Any] = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Only with a launcher: a backend without a process group to create makes Accelerate fail.
        handlers.append(InitProcessGroupKwargs(backend="nccl" if cuda else "gloo",
                                               timeout=PROCESS_GROUP_TIMEOUT))
    accelerator = Accelerator(
        cpu=not cuda and not deepspeed_requested(),
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        dynamo_backend="inductor" if cfg.train.compile else "no",
        log_with=log_with,
        kwargs_handlers=handlers,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, cfg,
                              accelerator.num_processes)
        check_chunking(cfg, accelerator.state.deepspeed_plugin.deepspeed_config)
    if cuda:
        # fp32 matmuls (the classifier and MLM head run outside autocast) may use TF32 tensor cores.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(cpu_threads(cfg.train.cpu_threads))
    return accelerator


def locate_deepspeed_json() -> None:
    """Let ``accelerate launch --config_file accelerate_configs/deepspeed_zero*.yaml`` run from anywhere.

    The YAML names its JSON relative to the repository root; from another directory Accelerate fails with a
    traceback. A relative path that does not exist here but does under the repository is made absolute.
    """
    from irra_dist.config import RECIPES_DIR

    name = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if not name or name == "none" or os.path.isabs(name) or os.path.exists(name):
        return
    in_repo = RECIPES_DIR.parent / name
    if in_repo.is_file():
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(in_repo)
    else:
        raise ConfigError(f"the DeepSpeed config {name} named by the accelerate config does not exist "
                          f"(looked in {os.getcwd()} and {RECIPES_DIR.parent}): give its absolute path")


def check_process_count(cuda: bool) -> None:
    """Refuse more processes per machine than GPUs, before any process group exists.

    The launcher configs (accelerate_configs/*.yaml) name a process count for an 8-GPU machine; on a machine
    with fewer GPUs the extra processes would share GPUs (or fail) instead of saying what to pass. On the CPU
    any count runs, but more processes than usable cores only slows every one of them down.

    Raises:
        ConfigError: more local processes than GPUs (one line with the ``--num_processes`` to pass).
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if cuda:
        gpus = torch.cuda.device_count()
        if local > gpus:
            raise ConfigError(f"accelerate launch started {local} processes on this machine but it has "
                              f"{gpus} GPU(s): pass --num_processes {gpus} to accelerate launch")
    elif local > usable_cores() and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        logger.warning("%d processes share %d usable CPU cores: pass --num_processes %d (or fewer) to "
                       "accelerate launch for a faster run", local, usable_cores(), usable_cores())


def cpu_threads(setting: int) -> int:
    """Threads per process on the CPU: `setting`, or with 0 the cores actually free, shared by the local
    processes (:func:`free_cores`).

    `accelerate launch` exports OMP_NUM_THREADS=1 whenever it is not told otherwise, which leaves all but one
    core idle in a single-process CPU run; 0 undoes that.
    """
    if setting > 0:
        return setting
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, free_cores() // local_processes)
    logger.info("CPU threads per process: %d (train.cpu_threads=0: %d usable cores, 1-minute load %.1f, "
                "%d local processes)", threads, usable_cores(), _load_average(), local_processes)
    return threads


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: taskset, cgroup cpusets), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def free_cores(usable: int | None = None, load: float | None = None) -> int:
    """Usable cores minus those other jobs keep busy (the 1-minute load average, rounded), at least 1.

    Oversubscribed cores slow every thread down (on 2 cores shared with another job, 2 threads trained at
    7-9 samples/s against 21-29 with 1), so threads go to the cores that are free when the run starts.
    """
    usable = usable_cores() if usable is None else usable
    load = _load_average() if load is None else load
    return max(1, min(usable, usable - round(load)))


def fill_deepspeed_config(ds_config: dict[str, Any], cfg: Config, num_processes: int) -> None:
    """Set the DeepSpeed batch, accumulation and clipping entries from the recipe, in place.

    The training loader stays out of ``accelerator.prepare`` (it shards by rank itself), so Accelerate cannot
    infer the micro-batch; it is written here. ``"auto"`` or missing entries are filled; explicit entries
    must agree with the recipe.

    Raises:
        ConfigError: an explicit entry that disagrees with the recipe.
    """
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "train_batch_size": cfg.train.batch_size * cfg.train.grad_accum_steps * num_processes,
        # 0 turns DeepSpeed's clipping off; Accelerate would otherwise fill "auto" with 1.0.
        "gradient_clipping": float(cfg.optim.grad_clip),
    }
    recipe_key = {"train_micro_batch_size_per_gpu": "train.batch_size",
                  "gradient_accumulation_steps": "train.grad_accum_steps",
                  "train_batch_size": "train.batch_size x processes x train.grad_accum_steps",
                  "gradient_clipping": "optim.grad_clip"}
    for key, value in wanted.items():
        current = ds_config.get(key, "auto")
        if current != "auto" and float(current) != float(value):
            raise ConfigError(f"the DeepSpeed config sets {key}={current} but the recipe gives {value} "
                              f"({recipe_key[key]}): set it to \"auto\" in the DeepSpeed JSON")
        ds_config[key] = value
    if "optimizer" in ds_config or "scheduler" in ds_config:
        raise ConfigError("the DeepSpeed config defines an optimizer or scheduler, but irra_dist builds its "
                          "own (optim.* in the recipe): remove those sections from the DeepSpeed JSON")


def unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP / torch.compile / a DeepSpeed engine.

    ``accelerator.unwrap_model`` imports DeepSpeed whenever it is installed, which logs "Setting accelerator
    to CPU" at every CPU evaluation of a run that does not use DeepSpeed; only DeepSpeed runs go through it.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.unwrap_model(model, keep_torch_compile=False)
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        elif is_compiled_module(model):
            model = model._orig_mod
        else:
            return model


def ddp_ignores_buffers(model: torch.nn.Module) -> None:
    """Keep DDP from broadcasting `model`'s buffers before every forward (they are constants, e.g. the fixed
    logit scale), without Accelerate's deprecated ``broadcast_buffers=False``."""
    names = [name for name, _ in model.named_buffers()]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def zero_stage(accelerator: Accelerator) -> int:
    """The DeepSpeed ZeRO stage, 0 when DeepSpeed is not used."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
               .get("stage", 0))
