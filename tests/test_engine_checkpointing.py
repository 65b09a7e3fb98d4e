"""Checkpoints: a round trip restores everything (RNG states included, through Accelerate's weights-only
loader), saves are atomic, damage is reported in one line."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import reset_accelerate
from torch import nn

from irra_dist.engine.checkpointing import (
    CHECKPOINTS_DIR,
    FILES_FILE,
    RNG_FILE,
    TrainerState,
    find_latest_run,
    load_checkpoint,
    resolve_checkpoint,
    run_dir_of,
    save_checkpoint,
    verify_checkpoint,
)
from irra_dist.model import CheckpointError

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _setup(seed: int = 0) -> tuple[Accelerator, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(5, 4)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_trainer_state_json_round_trip_and_bad_json(tmp_path: Path) -> None:
    state = TrainerState(epoch=3, batch_in_epoch=7, step=40, best_r1=12.5, best_epoch=2, nonfinite_steps=1,
                         global_batch_size=64, wandb_run_id="abc",
                         scheduler={"last_epoch": 2, "base_lrs": [1.0]})
    assert TrainerState.from_json(state.to_json(), tmp_path) == state
    with pytest.raises(CheckpointError, match="not a valid trainer state"):
        TrainerState.from_json('{"epoch": 1, "surprise": 2}', tmp_path / "x.json")


def test_save_then_load_restores_model_optimizer_and_state(tmp_path: Path) -> None:
    accelerator, model, optimizer = _setup()
    _step(model, optimizer)
    state = TrainerState(epoch=2, batch_in_epoch=3, step=5, best_r1=1.5, scheduler={"last_epoch": 1})
    ckpt = save_checkpoint(accelerator, tmp_path, state, ("last", "best"))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()

    reset_accelerate()
    accelerator, model, optimizer = _setup(seed=7)  # different weights, fresh optimizer
    loaded = load_checkpoint(accelerator, resolve_checkpoint(tmp_path))
    assert loaded == state
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moments)
    assert run_dir_of(ckpt) == tmp_path
    assert (tmp_path / CHECKPOINTS_DIR / "best").resolve() == ckpt.resolve()


def test_rng_is_restored_by_load(tmp_path: Path, caplog) -> None:
    accelerator, model, optimizer = _setup()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.standard_normal(), torch.rand(1)  # leave a cached gaussian in numpy
    ckpt = save_checkpoint(accelerator, tmp_path, TrainerState())
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    reset_accelerate()
    accelerator, model, optimizer = _setup(seed=99)
    random.seed(9)
    np.random.seed(9)
    load_checkpoint(accelerator, resolve_checkpoint(tmp_path))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected
    # A rank with no RNG file (the run resumed with more processes) keeps its own state, with a warning.
    (ckpt / RNG_FILE.format(rank=0)).unlink()
    listing = json.loads((ckpt / FILES_FILE).read_text())
    del listing[RNG_FILE.format(rank=0)]
    (ckpt / FILES_FILE).write_text(json.dumps(listing))
    reset_accelerate()
    accelerator, model, optimizer = _setup(seed=99)
    torch.manual_seed(4)
    mine = torch.rand(3)
    torch.manual_seed(4)
    load_checkpoint(accelerator, resolve_checkpoint(tmp_path))
    assert torch.equal(torch.rand(3), mine) and "no RNG state for rank 0" in caplog.text


def test_links_move_and_old_checkpoints_are_pruned(tmp_path: Path) -> None:
    accelerator, model, optimizer = _setup()
    first = save_checkpoint(accelerator, tmp_path, TrainerState(step=1), ("last", "best"))
    second = save_checkpoint(accelerator, tmp_path, TrainerState(step=2), ("last",))
    third = save_checkpoint(accelerator, tmp_path, TrainerState(step=3), ("last",))
    root = tmp_path / CHECKPOINTS_DIR
    assert os.readlink(root / "best") == first.name and os.readlink(root / "last") == third.name
    assert first.is_dir() and third.is_dir() and not second.exists()  # best keeps its folder alive
    assert sorted(p.name for p in root.iterdir()) == sorted(["best", "last", first.name, third.name])


def test_crash_during_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    accelerator, model, optimizer = _setup()
    good = save_checkpoint(accelerator, tmp_path, TrainerState(step=1))

    def dies_half_way(output_dir: str, **kwargs) -> None:
        Path(output_dir, "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # e.g. the job is cancelled mid-write

    monkeypatch.setattr(accelerator, "save_state", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, TrainerState(step=2))
    assert resolve_checkpoint(tmp_path) == good.resolve()
    assert verify_checkpoint(good).step == 1
    # The next successful save clears the debris.
    monkeypatch.undo()
    newer = save_checkpoint(accelerator, tmp_path, TrainerState(step=3))
    assert resolve_checkpoint(tmp_path) == newer.resolve()
    assert not (tmp_path / CHECKPOINTS_DIR / ".saving").exists()


def test_truncated_file_is_one_clear_error(tmp_path: Path) -> None:
    accelerator, model, optimizer = _setup()
    ckpt = save_checkpoint(accelerator, tmp_path, TrainerState(step=1))
    target = ckpt / "optimizer.bin"
    target.write_bytes(target.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated or damaged") as info:
        load_checkpoint(accelerator, ckpt)
    assert "optimizer.bin" in str(info.value) and "\n" not in str(info.value)


def test_corrupt_file_of_the_right_size_is_one_clear_error(tmp_path: Path) -> None:
    accelerator, model, optimizer = _setup()
    ckpt = save_checkpoint(accelerator, tmp_path, TrainerState(step=1))
    target = ckpt / "model.safetensors"
    target.write_bytes(b"\0" * target.stat().st_size)
    with pytest.raises(CheckpointError, match="is damaged") as info:
        load_checkpoint(accelerator, ckpt)
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_incomplete_checkpoint_and_bad_paths(tmp_path: Path) -> None:
    accelerator, model, optimizer = _setup()
    ckpt = save_checkpoint(accelerator, tmp_path, TrainerState(step=1))
    (ckpt / FILES_FILE).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path / "elsewhere")


def test_find_latest_run_picks_the_newest_last(tmp_path: Path) -> None:
    accelerator, model, optimizer = _setup()
    assert find_latest_run(tmp_path) is None
    save_checkpoint(accelerator, tmp_path / "a", TrainerState(step=1))
    newer = save_checkpoint(accelerator, tmp_path / "b", TrainerState(step=1))
    older_time = newer.stat().st_mtime - 100
    files = tmp_path / "a" / CHECKPOINTS_DIR / "last" / FILES_FILE
    os.utime(files, (older_time, older_time))
    assert find_latest_run(tmp_path) == tmp_path / "b"
    (tmp_path / "c").mkdir()  # a run that died before its first checkpoint is not a candidate
    assert find_latest_run(tmp_path) == tmp_path / "b"
    assert json.loads((newer / FILES_FILE).read_text())  # sizes recorded
