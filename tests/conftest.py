"""Shared fixtures: a tiny synthetic shard set built once per session, a tiny model recipe, and helpers to
run the trainer in-process or under ``accelerate launch``.

The shard set has 13 training identities with 5 images of 1 caption each: 65 training samples, so a global
batch of 16 gives 5 steps per epoch whose last batch holds ONE sample (with 2 processes, rank 1 then gets
an empty batch). The test split has 4 identities x 5 images (20 gallery images, 20 queries).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY_TRAIN_IDS = 13
TINY_IMAGES_PER_ID = 5
TINY_TRAIN_SAMPLES = TINY_TRAIN_IDS * TINY_IMAGES_PER_ID

# A CLIP-shaped model small enough to train a few steps in about a second on one core. The vocabulary must
# stay 49408 (the tokenizer's ids); everything else is tiny.
TINY_RECIPE: dict = {
    "name": "tiny",
    "model": {"pretrained": "none", "image_size": [64, 32], "stride_size": 16, "patch_size": 16,
              "embed_dim": 32, "vision_width": 32, "vision_layers": 1, "vision_heads": 2, "text_width": 32,
              "text_layers": 1, "text_heads": 2, "cmt_depth": 1},
    "data": {"num_workers": 0},
    "loss": {"names": ["sdm", "id", "mlm"]},
    "optim": {"lr": 1.0e-4, "warmup_epochs": 0},
    "train": {"num_epochs": 1, "batch_size": 16, "log_period": 1},
    # Selected on test, so that the tests comparing evaluations use the 20-item test split (uneven parts).
    "eval": {"eval_period": 1, "batch_size": 8, "split": "test"},
    "logging": {"wandb": False},
}


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of the tiny synthetic dataset (see the module docstring), built once per test session."""
    from irra_dist.data.shards import build_shards
    from irra_dist.synthetic.dataset import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("tiny_data")
    generate_synthetic_dataset(root / "CUHK-PEDES", num_train_ids=TINY_TRAIN_IDS, num_val_ids=2,
                               num_test_ids=4, images_per_id=(TINY_IMAGES_PER_ID, TINY_IMAGES_PER_ID),
                               captions_per_image=1, seed=3)
    out = root / "shards"
    build_shards("CUHK-PEDES", root, out, shard_size=16, workers=2)
    return out


@pytest.fixture(scope="session")
def make_tiny_recipe(tiny_shards: Path) -> Callable[[Path], Path]:
    """``make(folder)`` writes ``folder/tiny.yaml``: the tiny recipe on the tiny shards, runs under
    ``folder/runs``; returns the recipe's path."""

    def make(folder: Path) -> Path:
        recipe = {**TINY_RECIPE, "data": {**TINY_RECIPE["data"], "shards": str(tiny_shards)},
                  "train": {**TINY_RECIPE["train"], "output_dir": str(folder / "runs")}}
        path = folder / "tiny.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return make


@pytest.fixture
def tiny_recipe(make_tiny_recipe: Callable[[Path], Path], tmp_path: Path) -> Path:
    """The tiny recipe, writing runs under ``tmp_path/runs``."""
    return make_tiny_recipe(tmp_path)


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state, so that the next run builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate() -> None:
    """Run the test between two resets of Accelerate's state (in-process training or evaluation)."""
    reset_accelerate()
    yield
    reset_accelerate()


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: the repository importable, one thread each, W&B offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    return env


@pytest.fixture(scope="session")
def launch() -> Callable[..., subprocess.CompletedProcess]:
    """``run(cfg, script, args)``: ``accelerate launch --config_file accelerate_configs/<cfg> [launcher args]
    launch/<script> <args>`` from the repository root."""

    def run(accelerate_config: str, script: str, args: list[str], *, launcher_args: list[str] = (),
            timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        accelerate = Path(sys.executable).with_name("accelerate")
        # A free port per launch: other test runs on the machine may hold the default 29500.
        cmd = [str(accelerate), "launch", "--config_file", f"accelerate_configs/{accelerate_config}",
               "--main_process_port", str(free_port()), *launcher_args, f"launch/{script}", *args]
        return run_group(cmd, timeout=timeout, env={**subprocess_env(), **(env or {})})

    return run


def run_group(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: Path = REPO,
              ) -> subprocess.CompletedProcess:
    """Run `cmd` (from the repository root by default) in its own process group; on timeout kill the whole
    group (a launcher's training processes included), then fail the test."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])}... ran over {timeout} s and was killed:\n{(out + err)[-3000:]}")
    finally:
        try:  # leftovers of a launcher that exited early
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def small_irra(width: int = 32, heads: int = 2):
    """A random-init IRRA for the tiny shard set (13 train ids, 64x32 input, one layer a tower), eval mode."""
    from irra_dist.model import build_irra

    return build_irra(13, embed_dim=32, image_size=(64, 32), patch_size=16, stride_size=16,
                      vision_width=width, vision_layers=1, vision_heads=heads, text_width=width,
                      text_layers=1, text_heads=heads, cmt_depth=1).eval()


def direct_metrics(model, shards: Path, image_size: tuple[int, int] = (64, 32)) -> dict:
    """The reference for evaluation tests: every test image and caption of `shards` embedded by the model's
    towers called directly, scored by retrieval_metrics (itself checked against a naive sort)."""
    import torch

    from irra_dist.data.pipeline import build_eval_loaders
    from irra_dist.evaluation.metrics import retrieval_metrics

    gallery, queries = build_eval_loaders(shards, "test", batch_size=64, image_size=image_size)
    with torch.no_grad():
        g = [(model.encode_image(b["images"]), b["pids"]) for b in gallery]
        q = [(model.encode_text(b["caption_ids"]), b["pids"]) for b in queries]
    return retrieval_metrics(torch.cat([f for f, _ in q]), torch.cat([f for f, _ in g]),
                             torch.cat([p for _, p in q]), torch.cat([p for _, p in g]))


def train_reference(recipe: Path, run_name: str = "ref") -> Path:
    """Train `recipe` in this process on one thread, as each launched process runs: the 1-process reference
    that the multi-process runs are compared with. Returns the run folder."""
    import torch

    from irra_dist.config import load_config
    from irra_dist.engine.trainer import train

    reset_accelerate()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config(recipe, [f"train.run_name={run_name}"]))
    finally:
        torch.set_num_threads(before)
        reset_accelerate()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The out-of-the-box demo exactly as ``make demo`` runs it (``accelerate launch launch/train.py`` with no
    recipe), with only its output folders moved into a temporary directory: it generates the synthetic
    dataset and its shards, trains and evaluates. Returns (run folder, console output). Several minutes."""
    root = tmp_path_factory.mktemp("demo")
    accelerate = Path(sys.executable).with_name("accelerate")
    env = subprocess_env()
    for limit in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the demo uses every core, as for a user
        env.pop(limit)
    cmd = [str(accelerate), "launch", "--main_process_port", str(free_port()), "launch/train.py",
           f"data.shards={root / 'shards' / 'demo'}", "data.build_demo_if_missing=true",
           f"train.output_dir={root / 'runs'}", "train.run_name=demo"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    return root / "runs" / "demo", output
