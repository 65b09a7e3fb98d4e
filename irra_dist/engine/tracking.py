"""Weights & Biases through Accelerate's trackers: offline unless wandb finds a key that its server accepts.

The run's W&B files live in the run folder (``WANDB_DIR``), so an offline run can be uploaded later with
``wandb sync <run_dir>/wandb/offline-run-*``. ``logging.wandb_mode=auto`` leaves the decision to wandb's own
login: its credential lookup (``WANDB_API_KEY``, the netrc file, ``wandb login``), never a prompt, and, only
when a key is found, one check of it with the server that gives up after ``WANDB_HTTP_TIMEOUT`` seconds
(wandb's default: 10). Without a key the answer is offline at once, with no network access.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

from irra_dist.config import LoggingConfig

logger = logging.getLogger(__name__)


def resolve_wandb_mode(setting: str) -> str:
    """``logging.wandb_mode`` to ``"online"`` or ``"offline"``; logs why ``"auto"`` chose offline.

    ``"auto"`` is online only when wandb finds credentials and its server accepts them (an unreachable
    server, a rejected or malformed key: offline); an explicit ``WANDB_MODE=offline`` in the environment
    always wins.
    """
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return "offline"
    if setting != "auto":
        return setting
    import wandb

    try:
        if wandb.login(prompt=False, verify=True):
            return "online"
        reason = "no API key configured (WANDB_API_KEY, a netrc entry or wandb login)"
    except wandb.Error as err:  # verification failed: unreachable server, rejected or malformed key
        reason = str(err)
    logger.info("W&B is offline: %s", reason)
    return "offline"


def new_run_id() -> str:
    """A W&B-style run id (8 lowercase hex characters)."""
    return uuid.uuid4().hex[:8]


def init_wandb(accelerator: Any, cfg: LoggingConfig, *, run_dir: Path, run_name: str, run_id: str,
               config: dict[str, Any]) -> str:
    """Start the W&B tracker for this run (main process only; Accelerate skips the others).

    Args:
        accelerator: an Accelerator created with ``log_with="wandb"``.
        cfg: the ``logging`` section.
        run_dir: the run folder; W&B writes under ``run_dir/wandb``.
        run_name: display name.
        run_id: stable id; a resumed run passes the same one and continues the same W&B run.
        config: the resolved run config, stored with the run.

    Returns:
        The mode used, ``"online"`` or ``"offline"`` (``"offline"`` on the processes that start nothing).
    """
    # Before wandb reads its environment (in resolve_wandb_mode's login), so that it never sees it change.
    os.environ["WANDB_DIR"] = str(run_dir)
    # Only the main process starts W&B (and checks the key); the mode goes to wandb.init, not the environment,
    # so it does not leak into a later run.
    mode = resolve_wandb_mode(cfg.wandb_mode) if accelerator.is_main_process else "offline"
    # quiet: no W&B history/summary panel after the run's own final table (the same numbers, less readable).
    init_kwargs: dict[str, Any] = {"name": run_name, "dir": str(run_dir), "id": run_id, "resume": "allow",
                                   "mode": mode, "settings": {"quiet": True}}
    if cfg.entity:
        init_kwargs["entity"] = cfg.entity
    if cfg.group:
        init_kwargs["group"] = cfg.group
    accelerator.init_trackers(cfg.project, config=config, init_kwargs={"wandb": init_kwargs})
    if mode == "offline" and accelerator.is_main_process:
        logger.info("upload the offline W&B run later with: wandb sync %s/wandb/offline-run-*", run_dir)
    return mode


def finish_wandb() -> None:
    """Wait until W&B has written (offline) or uploaded (online) everything, then stop its service.

    ``accelerator.end_training()`` finishes the run, but the files may still be written in the background;
    after this call the offline run directory is complete (e.g. for ``wandb sync`` right away).
    """
    import wandb

    wandb.teardown()
