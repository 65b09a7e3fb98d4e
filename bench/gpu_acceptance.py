"""GPU acceptance in one command: everything that needs a GPU to be believed, in about 8 minutes on one GPU.

    python bench/gpu_acceptance.py [--json PATH] [--out DIR]     # on a machine with one CUDA GPU
    python bench/gpu_acceptance.py --dry-run                      # the same plan on the CPU at toy size (CI)

The plan, in order (each part is reported even when an earlier one failed):

1. ``gpu_tests``: the ``gpu``-marked tests (``pytest -m gpu``); on the CPU they are collected and skipped.
2. ``step_bf16`` / ``step_fp16``: the paper-shape training step (ViT-B/16, 384x128, batch 64, SDM+ID+MLM) in
   bf16 and in fp16 autocast, irra_dist beside the naive model (bench/gpu_step.py): samples/s, peak memory,
   MFU from the explicit FLOP count (bench/flops.py).
3. ``demo``: 200 optimizer steps of the demo recipe on the GPU, then an evaluation of the weights it
   exported (the ``irra-eval`` code path): samples/s and test R1.
4. ``deepspeed_zero2``: a single-GPU DeepSpeed ZeRO-2 run of the demo under ``accelerate launch`` (bf16): it
   must exit 0 and export fp32 weights (the optimizer's master copy, not bf16 values cast up).
5. ``chunked_big_batch``: when the config knows ``train.chunk_size`` (gradient-cached chunks), a global
   batch 8x the chunk trained in chunks: samples/s and peak memory; otherwise reported as not available.

One table on stdout and, with ``--json``, the same rows as JSON. The exit status is 0 only when every part
passed. The dry run uses a toy model, a tiny synthetic shard set and a few steps; it checks the plan, not
the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(BENCH), str(REPO)]

import gpu_step  # noqa: E402

from irra_dist.config import TrainConfig, load_config  # noqa: E402

TOY_MODEL = ["model.image_size=[64,32]", "model.stride_size=16", "model.patch_size=16", "model.embed_dim=32",
             "model.vision_width=32", "model.vision_layers=1", "model.vision_heads=2", "model.text_width=32",
             "model.text_layers=1", "model.text_heads=2", "model.cmt_depth=1"]
"""The dry run's model: the tests' tiny CLIP shape."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one acceptance run."""

    dry_run: bool
    demo_steps: int
    deepspeed_steps: int
    chunk_size: int
    launch_timeout_s: float

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.dry_run else torch.device("cuda", torch.cuda.current_device())


GPU_PLAN = Plan(dry_run=False, demo_steps=200, deepspeed_steps=50, chunk_size=64, launch_timeout_s=300)
DRY_PLAN = Plan(dry_run=True, demo_steps=3, deepspeed_steps=2, chunk_size=4, launch_timeout_s=300)


def _row(part: str, name: str, value: Any, unit: str = "", **extra: Any) -> dict[str, Any]:
    return {"part": part, "name": name, "value": value, "unit": unit, **extra}


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    return env


def _run_group(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run `cmd` in its own process group (killed whole on timeout): (status, output tail, seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or _child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return 124, (out or "")[-3000:], time.perf_counter() - start
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, out[-3000:], time.perf_counter() - start


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reset_accelerate() -> None:
    """Forget Accelerate's process-wide state between two in-process runs."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# --------------------------------------------------------------------------------------------------
# The parts


def part_gpu_tests(plan: Plan, work: Path) -> list[dict[str, Any]]:
    # Only the files that hold gpu-marked tests: collecting the whole suite takes longer than running them.
    files = sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").glob("test_*.py")
                   if "mark.gpu" in f.read_text())
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    status, out, seconds = _run_group(cmd, timeout=plan.launch_timeout_s)
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    # pytest exits 5 when every gpu test was deselected or skipped (the CPU dry run).
    ok = status == 0 or (plan.dry_run and status in (0, 5) and " failed" not in summary)
    return [_row("gpu_tests", "pytest -m gpu", summary, ok=ok, seconds=round(seconds, 1))]


def part_step(plan: Plan, work: Path, dtype: torch.dtype) -> list[dict[str, Any]]:
    name = {torch.bfloat16: "step_bf16", torch.float16: "step_fp16"}[dtype]
    if plan.dry_run:
        setup = gpu_step.dry_run_setup()
    else:
        setup = gpu_step.paper_setup(steps=10, warmup=3, eval_steps=3)
    rows = gpu_step.benchmark(setup, plan.device, amp_dtype=dtype)
    keep = ("train_samples_per_s", "train_peak_gpu_memory", "train_mfu", "train_step_time")
    return [_row(name, r["name"], r["value"], r["unit"], naive=r["baseline"], ratio=r["ratio"], ok=True)
            for r in rows if r["name"] in keep]


def _demo_overrides(plan: Plan, work: Path, shards: Path) -> list[str]:
    common = [f"data.shards={shards}", f"train.output_dir={work / 'runs'}", "logging.wandb=false"]
    if plan.dry_run:
        common += [*TOY_MODEL, "data.num_workers=0", "train.batch_size=8", "eval.batch_size=16",
                   "train.log_period=1"]
    return common


def _tiny_shards(work: Path) -> Path:
    """A tiny synthetic shard set for the dry run (13 training identities, 3 test identities)."""
    from irra_dist.data.shards import build_shards
    from irra_dist.synthetic.dataset import generate_synthetic_dataset

    out = work / "shards"
    if not (out / "manifest.json").is_file():
        generate_synthetic_dataset(work / "raw" / "CUHK-PEDES", num_train_ids=13, num_val_ids=2,
                                   num_test_ids=3, images_per_id=(5, 5), captions_per_image=1, seed=3)
        build_shards("CUHK-PEDES", work / "raw", out, shard_size=16, workers=1)
    return out


def part_demo(plan: Plan, work: Path, shards: Path) -> list[dict[str, Any]]:
    from irra_dist.engine.evaluate import evaluate_target
    from irra_dist.engine.runlog import read_metrics
    from irra_dist.engine.trainer import train

    cfg = load_config(REPO / "configs" / "demo.yaml",
                      [*_demo_overrides(plan, work, shards), "train.run_name=demo",
                       f"train.max_steps={plan.demo_steps}"])
    _reset_accelerate()
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)
    start = time.perf_counter()
    run_dir = train(cfg)
    seconds = time.perf_counter() - start
    _reset_accelerate()
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    steps = rows[-1]["step"] if rows else 0
    speed = sum(r["samples_per_s"] for r in rows[1:]) / max(len(rows) - 1, 1) if rows else 0.0
    result = evaluate_target(run_dir, weights="last", batch_size=cfg.eval.batch_size,
                             num_workers=cfg.data.num_workers)
    _reset_accelerate()
    r1 = result["metrics"]["t2i"]["R1"]
    ok = steps == plan.demo_steps and all(map(_finite, (rows[-1]["loss"] if rows else float("nan"), r1)))
    return [_row("demo", "optimizer steps", steps, ok=ok, seconds=round(seconds, 1)),
            _row("demo", "train samples/s (after the first log window)", speed, "samples/s", ok=ok),
            _row("demo", "test t2i R1 of the exported weights", r1, "%", ok=ok,
                 gallery=result["num_gallery"], queries=result["num_queries"])]


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def part_deepspeed(plan: Plan, work: Path, shards: Path) -> list[dict[str, Any]]:
    from safetensors.torch import load_file

    accelerate = str(Path(sys.executable).with_name("accelerate"))
    run_dir = work / "runs" / "deepspeed_zero2"
    cmd = [accelerate, "launch", "--config_file", "accelerate_configs/deepspeed_zero2.yaml",
           "--num_processes", "1", "--main_process_port", str(_free_port()),
           "launch/train.py", "--config", "demo", *_demo_overrides(plan, work, shards),
           "train.run_name=deepspeed_zero2", "train.mixed_precision=bf16",
           f"train.max_steps={plan.deepspeed_steps}", "train.cpu_threads=0"]
    status, out, seconds = _run_group(cmd, plan.launch_timeout_s)
    rows = [_row("deepspeed_zero2", "exit status", status, ok=status == 0, seconds=round(seconds, 1))]
    if status != 0:
        rows[0]["output_tail"] = out
        return rows
    weights = load_file(run_dir / "model.safetensors")
    floating = [t for t in weights.values() if t.is_floating_point()]
    all_fp32 = all(t.dtype == torch.float32 for t in floating)
    # Master weights hold values that bf16 cannot represent; bf16 weights cast up would not.
    beyond_bf16 = sum(int((t != t.to(torch.bfloat16).float()).any()) for t in floating)
    rows.append(_row("deepspeed_zero2", "exported tensors fp32 / beyond bf16 precision",
                     f"{all_fp32} / {beyond_bf16} of {len(floating)}", ok=all_fp32 and beyond_bf16 > 0,
                     run_dir=str(run_dir)))
    return rows


def chunking_available() -> bool:
    """Whether this version has gradient-cached chunks (``train.chunk_size``)."""
    return "chunk_size" in {f.name for f in dataclasses.fields(TrainConfig)}


def part_chunked(plan: Plan, work: Path, shards: Path) -> list[dict[str, Any]]:
    if not chunking_available():
        return [_row("chunked_big_batch", "train.chunk_size", "not in this version", ok=True)]
    from irra_dist.engine.runlog import read_metrics
    from irra_dist.engine.trainer import train

    big = 8 * plan.chunk_size
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      [*_demo_overrides(plan, work, shards), "train.run_name=chunked",
                       f"train.batch_size={big}", f"train.chunk_size={plan.chunk_size}", "train.max_steps=3",
                       "eval.eval_period=0"])
    _reset_accelerate()
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)
    run_dir = train(cfg)
    _reset_accelerate()
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    ok = bool(rows) and _finite(rows[-1]["loss"])
    return [_row("chunked_big_batch", f"batch {big} in chunks of {plan.chunk_size}",
                 rows[-1]["samples_per_s"] if rows else None, "samples/s", ok=ok,
                 peak_gib=_peak_memory_gib(plan.device))]


# --------------------------------------------------------------------------------------------------


def run_plan(plan: Plan, work: Path, shards: Path | None) -> list[dict[str, Any]]:
    """Every part in order; a part that raises is one failed row, and the plan goes on."""
    if shards is None:
        shards = _tiny_shards(work) if plan.dry_run else work / "shards" / "demo"  # the demo builds it
    parts: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("gpu_tests", lambda: part_gpu_tests(plan, work)),
        ("step_bf16", lambda: part_step(plan, work, torch.bfloat16)),
        ("step_fp16", lambda: part_step(plan, work, torch.float16)),
        ("demo", lambda: part_demo(plan, work, shards)),
        ("deepspeed_zero2", lambda: part_deepspeed(plan, work, shards)),
        ("chunked_big_batch", lambda: part_chunked(plan, work, shards)),
    ]
    rows = []
    for name, part in parts:
        start = time.perf_counter()
        try:
            rows += part()
        except Exception as err:  # noqa: BLE001 - reported as a failed part
            rows.append(_row(name, "error", f"{type(err).__name__}: {err}", ok=False,
                             traceback=traceback.format_exc()[-2000:]))
        print(f"[{name}] {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    def show(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = [f"{'part':<18} {'measure':<48} {'value':>14} {'unit':<10} {'naive':>10} ok"]
    for r in rows:
        naive = show(r["naive"]) if r.get("naive") is not None else ""
        lines.append(f"{r['part']:<18} {r['name']:<48} {show(r['value']):>14} {r['unit']:<10} {naive:>10} "
                     f"{'yes' if r.get('ok') else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same plan on the CPU at toy size")
    parser.add_argument("--json", type=Path, help="also write the rows (and the machine) as JSON here")
    parser.add_argument("--out", type=Path, help="working folder (runs, shards); default a temporary one")
    parser.add_argument("--shards", type=Path, help="an existing demo shard set (default: generated)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device: run this on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="irra_acceptance_") as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = run_plan(plan, work, args.shards)
    seconds = time.perf_counter() - start
    print(format_rows(rows))
    passed = all(r.get("ok") for r in rows)
    print(f"{'PASSED' if passed else 'FAILED'} in {seconds:.0f} s "
          f"({'dry run on the CPU' if plan.dry_run else torch.cuda.get_device_name(plan.device)})")
    if args.json is not None:
        machine = {"device": "cpu (dry run)" if plan.dry_run else torch.cuda.get_device_name(plan.device),
                   "torch": torch.__version__, "cuda": torch.version.cuda}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "seconds": seconds, "passed": passed,
                                         "rows": rows}, indent=1, default=str) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
