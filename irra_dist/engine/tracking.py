"""Weights & Biases through Accelerate's trackers: offline unless a key is configured and the server answers.

The run's W&B files live in the run folder (``WANDB_DIR``), so an offline run can be uploaded later with
``wandb sync <run_dir>/wandb/offline-run-*``. Nothing here may block on the network for long: the only
online check is a TCP connect with a short timeout, and only when credentials exist.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from irra_dist.config import LoggingConfig

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.wandb.ai"
PROBE_TIMEOUT_S = 3.0


def _base_url(env: Mapping[str, str]) -> str:
    return env.get("WANDB_BASE_URL", DEFAULT_BASE_URL)


def has_wandb_credentials(env: Mapping[str, str] | None = None, netrc_file: Path | None = None) -> bool:
    """True when an API key is configured: ``WANDB_API_KEY`` or a ``~/.netrc`` entry (``wandb login``).

    Args:
        env: environment to read (``os.environ`` when None).
        netrc_file: netrc path (``$NETRC`` or ``~/.netrc`` when None).
    """
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return True
    path = netrc_file or Path(env.get("NETRC", Path.home() / ".netrc"))
    host = urlparse(_base_url(env)).hostname or ""
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def service_reachable(base_url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the W&B server opens within `timeout_s`."""
    parsed = urlparse(base_url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_wandb_mode(setting: str, env: Mapping[str, str] | None = None,
                       netrc_file: Path | None = None) -> str:
    """``logging.wandb_mode`` to ``"online"`` or ``"offline"``.

    ``"auto"`` is online only when credentials exist and the server answers a connect within a few
    seconds; an explicit ``WANDB_MODE=offline`` in the environment always wins.
    """
    env = os.environ if env is None else env
    if env.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return "offline"
    if setting != "auto":
        return setting
    if not has_wandb_credentials(env, netrc_file):
        return "offline"
    return "online" if service_reachable(_base_url(env)) else "offline"


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
        The mode used, ``"online"`` or ``"offline"``.
    """
    mode = resolve_wandb_mode(cfg.wandb_mode)
    # The mode goes to wandb.init (not the environment), so it does not leak into a later run.
    os.environ["WANDB_DIR"] = str(run_dir)
    # quiet: no W&B history/summary panel after the run's own final table (the same numbers, less readable).
    init_kwargs: dict[str, Any] = {"name": run_name, "dir": str(run_dir), "id": run_id, "resume": "allow",
                                   "mode": mode, "settings": {"quiet": True}}
    if cfg.entity:
        init_kwargs["entity"] = cfg.entity
    if cfg.group:
        init_kwargs["group"] = cfg.group
    accelerator.init_trackers(cfg.project, config=config, init_kwargs={"wandb": init_kwargs})
    if mode == "offline":
        logger.info("W&B is offline (%s); upload later with: wandb sync %s/wandb/offline-run-*",
                    "no API key configured" if not has_wandb_credentials() else "server unreachable",
                    run_dir)
    return mode


def finish_wandb() -> None:
    """Wait until W&B has written (offline) or uploaded (online) everything, then stop its service.

    ``accelerator.end_training()`` finishes the run, but the files may still be written in the background;
    after this call the offline run directory is complete (e.g. for ``wandb sync`` right away).
    """
    import wandb

    wandb.teardown()
