"""A run folder's ownership: one training at a time per folder.

- :func:`claim_run_folder` takes the folder for this training before anything is written into it: an
  exclusive ``flock`` on ``<run>/.lock`` (released by the kernel when the process dies, so a killed run never
  leaves a stale lock), and for a new run the check that no other run already lives there. A second start on
  the same folder is a one-line :class:`ConfigError`.
- Where the run's data is (locations stored resolved, found again after a move) is the library's
  :mod:`irra_dist.run_config`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

from irra_dist.config import ConfigError
from irra_dist.engine.runlog import CONFIG_FILE

LOCK_FILE = ".lock"
"""Held (flock) by the main process of the training that owns the run folder."""


class RunFolderClaim:
    """This process's hold on a run folder; :meth:`release` lets it go, :meth:`discard_unused` removes a
    folder this start created when it holds no checkpoint yet (a start that failed leaves nothing behind)."""

    def __init__(self, run_dir: Path, fd: int | None, created: bool) -> None:
        self.run_dir = run_dir
        self.fd = fd
        self.created = created

    def discard_unused(self) -> bool:
        """Remove the run folder if this start created it and no checkpoint was saved; True if removed."""
        from irra_dist.engine.checkpointing import CHECKPOINTS_DIR

        if self.fd is None or not self.created or (self.run_dir / CHECKPOINTS_DIR / "last").exists():
            return False
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def _lock_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        pid = ""
    return f" (pid {pid})" if pid.isdigit() else ""


def claim_run_folder(run_dir: Path, *, new: bool) -> RunFolderClaim:
    """Create (if needed) and lock `run_dir` for this training. Call it on the main process only.

    Args:
        run_dir: the run folder.
        new: a fresh run (the folder must not hold a run yet) rather than a resume.

    Raises:
        ConfigError: another training holds the folder, or a new run would overwrite an existing one.
    """
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(f"cannot create the run folder {run_dir} ({err.strerror}): set train.output_dir to "
                          "a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = _lock_holder(fd)
        os.close(fd)
        if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        raise ConfigError(f"run folder {run_dir} is in use by another training{holder}: wait for it to end, "
                          "or choose another train.run_name") from None
    if new and (run_dir / CONFIG_FILE).exists():
        os.close(fd)
        raise ConfigError(f"run folder {run_dir} already exists: resume it with --resume {run_dir}, or "
                          "choose another train.run_name")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunFolderClaim(run_dir, fd, created)
