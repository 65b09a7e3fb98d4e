"""A run folder's config.yaml, written with resolved locations and read back from wherever the run now is.

- :func:`absolute_locations` stores resolved paths in the run config (the shard set, the output folder, a
  pretrained file), so the run does not depend on the directory it was started in;
- :func:`load_run_config` reads a run's config.yaml back and finds the shard set again after the repository
  (run folder and shards together) was moved. Evaluation, search and the trainer's resume all read runs
  through it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from irra_dist.config import Config, load_config
from irra_dist.data.shards import MANIFEST_NAME
from irra_dist.data.sources import is_remote
from irra_dist.model.weights import CONFIG_FILE


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
