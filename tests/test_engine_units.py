"""Small engine pieces: precision and DeepSpeed settings from the recipe, W&B mode, gathering evaluation
parts back into split order, metric rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from irra_dist.config import Config, ConfigError, config_from_dict
from irra_dist.engine.accel import fill_deepspeed_config, resolve_mixed_precision
from irra_dist.engine.evaluate import (
    embedding_autocast,
    embedding_precision,
    flat_metrics,
    gather_in_order,
)
from irra_dist.engine.runlog import MetricsWriter, read_metrics
from irra_dist.engine.tracking import resolve_wandb_mode


@pytest.mark.parametrize(("setting", "cuda", "bf16", "expected"), [
    ("auto", False, False, "no"),
    ("auto", True, True, "bf16"),
    ("auto", True, False, "fp16"),
    ("fp16", False, False, "fp16"),
    ("no", True, True, "no"),
])
def test_mixed_precision_resolution(setting: str, cuda: bool, bf16: bool, expected: str) -> None:
    assert resolve_mixed_precision(setting, cuda=cuda, bf16=bf16) == expected


def _cfg(**train) -> Config:
    return config_from_dict({"train": {"batch_size": 8, "grad_accum_steps": 3, **train},
                             "optim": {"grad_clip": 0.0}})


def test_deepspeed_auto_values_come_from_the_recipe() -> None:
    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
          "zero_optimization": {"stage": 2}}
    fill_deepspeed_config(ds, _cfg(), num_processes=4)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 8 * 3 * 4
    assert ds["gradient_clipping"] == 0.0  # Accelerate would have filled "auto" with 1.0


def test_deepspeed_missing_entries_are_added_and_agreeing_ones_kept() -> None:
    ds = {"train_micro_batch_size_per_gpu": 8}
    fill_deepspeed_config(ds, _cfg(), num_processes=2)
    assert ds["train_batch_size"] == 48 and ds["gradient_accumulation_steps"] == 3


@pytest.mark.parametrize(("entry", "fragment"), [
    ({"train_micro_batch_size_per_gpu": 16}, "train.batch_size"),
    ({"gradient_clipping": 1.0}, "optim.grad_clip"),
    ({"optimizer": {"type": "AdamW"}}, "optimizer or scheduler"),
])
def test_deepspeed_contradictions_are_config_errors(entry: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        fill_deepspeed_config(dict(entry), _cfg(), num_processes=2)


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch):
    """No W&B credentials anywhere wandb looks (environment, netrc, its settings files), a fresh wandb session
    that reads this environment, and the wandb service stopped afterwards."""
    import wandb

    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    wandb.teardown()
    yield tmp_path
    wandb.teardown()


def _timed_mode(setting: str) -> tuple[str, float]:
    import time

    start = time.monotonic()
    return resolve_wandb_mode(setting), time.monotonic() - start


def test_wandb_mode_auto_is_offline_at_once_without_credentials(wandb_env: Path, monkeypatch, caplog) -> None:
    with caplog.at_level("INFO", logger="irra_dist.engine.tracking"):
        mode, seconds = _timed_mode("auto")
    assert mode == "offline" and seconds < 2.0
    assert "no API key configured" in caplog.text
    assert resolve_wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode("online") == "offline"


def test_wandb_mode_auto_checks_a_netrc_key_with_the_server_and_gives_up_in_time(wandb_env: Path, monkeypatch,
                                                                                 caplog) -> None:
    # wandb's own netrc lookup finds the key for this host; the server (the discard port) refuses.
    netrc = wandb_env / "netrc"
    netrc.write_text(f"machine 127.0.0.1:9\n  login user\n  password {'a' * 40}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_HTTP_TIMEOUT", "2")
    with caplog.at_level("INFO", logger="irra_dist.engine.tracking"):
        mode, seconds = _timed_mode("auto")
    assert mode == "offline" and seconds < 15.0  # WANDB_HTTP_TIMEOUT plus starting wandb's service
    assert "127.0.0.1:9" in caplog.text and "no API key" not in caplog.text


def test_wandb_mode_auto_with_a_malformed_key_is_offline_with_the_reason(wandb_env: Path, monkeypatch,
                                                                        caplog) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "k")
    with caplog.at_level("INFO", logger="irra_dist.engine.tracking"):
        mode, seconds = _timed_mode("auto")
    assert mode == "offline" and seconds < 2.0
    assert "WANDB_API_KEY invalid" in caplog.text


class _OneProcess:
    """The parts of an Accelerator that gather_in_order uses, for a single process."""

    num_processes = 1

    @staticmethod
    def gather(tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def test_gather_in_order_sorts_by_split_position() -> None:
    feats = torch.arange(12.0).reshape(4, 3)
    index = torch.tensor([2, 0, 3, 1])
    pids = torch.tensor([20, 0, 30, 10])
    f, p, i = gather_in_order(_OneProcess(), feats, pids, index)
    assert i.tolist() == [0, 1, 2, 3]
    assert p.tolist() == [0, 10, 20, 30]
    assert torch.equal(f, feats[[1, 3, 0, 2]])


@pytest.mark.parametrize(("precision", "expected"), [("train", torch.bfloat16), ("fp32", torch.float32),
                                                    ("fp16", torch.float32)])  # no fp16 embedding on a CPU
def test_eval_precision_overrides_the_training_autocast(precision: str, expected: torch.dtype) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    layer = torch.nn.Linear(4, 4)
    with embedding_autocast(accelerator, precision)():
        assert layer(torch.ones(2, 4)).dtype == expected


def test_irra_eval_precision_follows_the_run_unless_given() -> None:
    from irra_dist.config import load_config

    official, demo = load_config("irra_official"), load_config("demo")
    assert embedding_precision("auto", official) == "fp16"  # as the run evaluated during training
    assert embedding_precision("auto", demo) == "train"
    assert embedding_precision("auto", None) == "fp16"  # an official best.pth: the official fp16 model
    assert embedding_precision("bf16", official) == "train"  # --precision bf16 is the accelerator's autocast


def test_flat_metrics_names() -> None:
    flat = flat_metrics({"t2i": {"R1": 1.0, "mAP": 2.0}, "i2t": {"R1": 3.0}})
    assert flat == {"eval/t2i_R1": 1.0, "eval/t2i_mAP": 2.0, "eval/i2t_R1": 3.0}


def test_metrics_writer_appends_and_truncates_after_a_step(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "metrics.jsonl", enabled=True)
    for step in (1, 2, 3, 4):
        writer.write({"kind": "train", "step": step})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "tr')  # a torn line from a killed run
    writer.truncate_after(2)
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    MetricsWriter(tmp_path / "other.jsonl", enabled=False).write({"step": 1})
    assert not (tmp_path / "other.jsonl").exists()


def test_cpu_threads_share_the_cores_among_local_processes(monkeypatch) -> None:
    from irra_dist.engine.accel import cpu_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu_threads(0) == 8  # one process: every core, whatever OMP_NUM_THREADS accelerate exported
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads(0) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert cpu_threads(0) == 1
    assert cpu_threads(3) == 3  # an explicit train.cpu_threads wins


@pytest.mark.parametrize("remote", ["http://127.0.0.1:8000/set/", "pipe:curl -s http://h/set"])
def test_remote_shard_locations_are_stored_as_written(remote: str, tmp_path: Path, monkeypatch):
    """The run folder stores local locations absolute, but a URL is no path: Path() would fold its '//'."""
    from irra_dist.run_config import absolute_locations, relocate
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"data": {"shards": remote, "demo_shards": "rel/demo"}})
    stored = absolute_locations(cfg)
    assert stored.data.shards == remote
    assert stored.data.demo_shards == str(tmp_path / "rel" / "demo")
    assert relocate(remote, tmp_path / "runs" / "b", tmp_path / "runs" / "a") == remote
