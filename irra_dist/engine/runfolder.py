"""A run folder's ownership and locations: one training at a time per folder, usable from any directory.

- :func:`claim_run_folder` takes the folder for this training before anything is written into it: an
  exclusive ``flock`` on ``<run>/.lock`` (released by the kernel when the process dies, so a killed run never
  leaves a stale lock), and for a new run the check that no other run already lives there. A second start on
  the same folder is a one-line :class:`ConfigError`.
- :func:`absolute_locations` stores resolved paths in the run config (the shard set, the output folder, a
  pretrained file), so the run does not depend on the directory it was started in;
  :func:`load_run_config` reads a run's config.yaml back and finds the shard set again after the
  repository (run folder and shards together) was moved.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import shutil
from pathlib import Path

from irra_dist.config import Config, ConfigError, load_config
from irra_dist.data.shards import MANIFEST_NAME
from irra_dist.data.sources import is_remote
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


# --------------------------------------------------------------------------------------------------
# Locations


def _absolute(path: str) -> str:
    """A local path made absolute; a remote location (http://, s3://, pipe:) is kept as written."""
    if not path or is_remote(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def absolute_locations(cfg: Config) -> Config:
    """`cfg` with ``data.shards``, ``data.demo_shards``, ``train.output_dir`` and a pretrained *file* made
    absolute (relative to the current directory), as the run folder's config.yaml must store them."""
    data = dataclasses.replace(cfg.data, shards=_absolute(cfg.data.shards),
                               demo_shards=_absolute(cfg.data.demo_shards),
                               sources=[dataclasses.replace(s, shards=_absolute(s.shards))
                                        for s in cfg.data.sources])
    train = dataclasses.replace(cfg.train, output_dir=_absolute(cfg.train.output_dir))
    model = cfg.model
    if Path(model.pretrained).expanduser().is_file():
        model = dataclasses.replace(model, pretrained=_absolute(model.pretrained))
    return dataclasses.replace(cfg, data=data, train=train, model=model)


def _has_shards(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def relocate(path: str, run_dir: Path, saved_run_dir: Path) -> str:
    """Where `path` (stored by a run that lived at `saved_run_dir`) is now that the run is at `run_dir`.

    A location that still holds shards is kept; otherwise, if the run folder moved, the same position
    relative to the run folder is tried (repository moved as a whole). A relative location (runs written
    before locations were stored resolved) is taken relative to the current directory, then to the folder
    holding the run's output folder. A remote location is kept as written.
    """
    if not path or is_remote(path):
        return path
    stored = Path(path).expanduser()
    candidates = [stored]
    if stored.is_absolute():
        if saved_run_dir.resolve() != run_dir.resolve():
            candidates.append(run_dir / os.path.relpath(stored, saved_run_dir))
    else:
        candidates.append(run_dir.parent.parent / stored)
    for candidate in candidates:
        if _has_shards(candidate):
            return os.path.normpath(os.path.abspath(candidate))
    return os.path.normpath(os.path.abspath(stored))


def load_run_config(run_dir: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """A run folder's config.yaml with its shard locations found again from wherever the run now is.

    Raises:
        ConfigError: an unreadable config.
    """
    run_dir = Path(run_dir).resolve()
    cfg = load_config(run_dir / CONFIG_FILE, overrides)
    saved_run_dir = Path(cfg.train.output_dir) / run_dir.name if cfg.train.output_dir else run_dir
    data = dataclasses.replace(cfg.data, shards=relocate(cfg.data.shards, run_dir, saved_run_dir),
                               demo_shards=relocate(cfg.data.demo_shards, run_dir, saved_run_dir),
                               sources=[dataclasses.replace(s, shards=relocate(s.shards, run_dir,
                                                                               saved_run_dir))
                                        for s in cfg.data.sources])
    train = dataclasses.replace(cfg.train, output_dir=str(run_dir.parent))
    return dataclasses.replace(cfg, data=data, train=train)
