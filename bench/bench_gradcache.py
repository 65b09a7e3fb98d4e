"""Gradient-cached chunks (``train.chunk_size``): memory and time of a big SDM batch, and a 24 GB projection.

Part 1 (measured on this machine): the paper's shape scaled down to fit a CPU (width 256, 4 image + 4 text
layers, cross-modal depth 4, 192x64 images, the real 49,408-token vocabulary and 11,003 identities) trains
full steps (forward, SDM + ID + MLM, backward, Adam) at

- batch 32 unchunked (the baseline),
- batch 256 unchunked,
- batch 256 in chunks of 32 (irra_dist's GradientCache, the trainer's own code path).

Per case: seconds per sample (median step / batch) and the peak resident memory of one steady-state step
(the whole process: runtime, weights, gradients, Adam state, the batch, activations) and its growth during
the step. Each case runs in a fresh interpreter with glibc's mmap threshold pinned, so freed tensors leave
the resident set. The first steps' losses of the two batch-256 cases are printed: equal losses after an
optimizer step show that the chunked step computed the same update.

Part 2 (measured here, then projected): the per-sample training memory of ViT-B/16 at 384x128 under bf16
autocast (the resident-set growth of one step at batch 3 minus batch 1, over 2) and the memory of the SDM
loss per (global batch)^2, from which the largest batch on a 24 GiB GPU is projected, unchunked and in
chunks. The projection assumes GPU activations of the same size as CPU bf16 autocast activations (same
autocast casts; SDPA keeps no attention matrix on either) and a fixed 1 GiB for the CUDA context and
workspaces; ``measure_step(..., device="cuda")`` measures it on a GPU instead.

Usage: python bench/bench_gradcache.py [--quick] [--json PATH] [--threads N] [--no-projection]
On a GPU (bench/ on sys.path): ``measure_step(512, 64, shape="vit_b16", precision="bf16", device="cuda")``
gives the time per sample and the allocator's peak of the official recipe at a global batch of 512 in chunks
of 64 (configs/irra_1gpu_bigbatch.yaml); ``measure_step(64, 0, ...)`` the official batch 64 beside it.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Any

from common import bench_main, measure_in_subprocess, peak_rss_growth, proc_kib, reset_peak_rss

# Pin glibc's mmap threshold: large tensors are then mmapped and unmapped on free, so RSS tracks them.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
NUM_CLASSES = 11003  # CUHK-PEDES training identities
LOSS_NAMES = ("sdm", "id", "mlm")
GIB = 2.0 ** 30
GPU_BYTES = 24 * GIB
CUDA_OVERHEAD = 1.0 * GIB
"""Assumed CUDA context, cuBLAS/cuDNN workspaces and allocator slack on the GPU (not measurable here)."""


def _shape(name: str, layers: int = 4, width: int = 256) -> dict[str, Any]:
    """build_irra sizes: "vit_b16" (the paper: ViT-B/16 at 384x128) or "scaled" (`width`, 192x64)."""
    from irra_dist.model.clip import ClipSizes

    paper = dataclasses.asdict(ClipSizes())
    if name == "vit_b16":
        return {**paper, "cmt_depth": 4}
    heads = max(width // 64, 1)
    return {**paper, "embed_dim": width, "image_size": (192, 64), "vision_width": width,
            "vision_heads": heads, "vision_layers": layers, "text_width": width, "text_heads": heads,
            "text_layers": layers, "cmt_depth": layers}


def _batch(sizes: dict[str, Any], batch_size: int, device):
    """A random batch of the model's keys (bench/gpu_step.py's maker); two captions per identity."""
    import torch
    from common import variant_batch
    from gpu_step import BenchSetup, make_batch

    clip = {k: v for k, v in sizes.items() if k != "cmt_depth"}
    setup = BenchSetup(clip, sizes["cmt_depth"], NUM_CLASSES, batch_size, 1, 0, 1, 1)
    # the official aliasing, as the trainer's batches: the masked captions as caption_ids
    return variant_batch(make_batch(setup, device, torch.Generator().manual_seed(0)), "irra_dist")


class _Stepper:
    """A model, its Adam and an Accelerator; ``step(batch)`` is one training step, chunked or not."""

    def __init__(self, sizes: dict[str, Any], chunk_size: int, batch_size: int, precision: str,
                 device: str) -> None:
        import torch
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        from irra_dist.config import Config
        from irra_dist.engine.gradcache import build_grad_cache
        from irra_dist.model import build_irra
        from irra_dist.optim import build_optimizer

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        self.acc = Accelerator(cpu=device == "cpu", mixed_precision=precision)
        self.cfg = Config()
        self.cfg.loss.names = list(LOSS_NAMES)
        self.cfg.train.batch_size, self.cfg.train.chunk_size = batch_size, chunk_size
        torch.manual_seed(0)  # the same weights in every case
        clip = {k: v for k, v in sizes.items() if k != "cmt_depth"}
        model = build_irra(NUM_CLASSES, cmt_depth=sizes["cmt_depth"], **clip).to(self.acc.device)
        self.num_params = sum(p.numel() for p in model.parameters())
        optimizer = build_optimizer(model, self.cfg.optim)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.model.train()
        self.grad_cache = build_grad_cache(self.acc, self.model, self.cfg)

    def step(self, batch: dict) -> float:
        """One optimizer step on `batch`; returns the loss (one host sync, at the end)."""
        import torch

        from irra_dist.losses import irra_losses

        rows = int(batch["pids"].shape[0])
        masked = int((batch["mlm_labels"] != 0).sum())
        normalizers = {"batch": float(rows), "mlm": float(max(masked, 1))}
        if self.grad_cache is not None:
            cached = self.grad_cache.forward(batch, [rows], normalizers, masked)
            total = cached.total
            self.grad_cache.backward(cached)
        else:
            losses = irra_losses(self.model(batch), batch, LOSS_NAMES, weights={}, normalizers=normalizers)
            total = torch.stack(list(losses.values())).sum()
            self.acc.backward(total)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total.detach())


def measure_step(batch_size: int, chunk_size: int = 0, *, shape: str = "scaled", layers: int = 4,
                 width: int = 256, precision: str = "no", device: str = "cpu", warmup: int = 1,
                 timed: int = 2) -> dict[str, Any]:
    """Time and peak memory of full training steps in this process (CUDA: the allocator's peak).

    Args:
        batch_size: rows per step.
        chunk_size: rows per chunk (0: the plain step).
        shape: "scaled" (width 256, 192x64) or "vit_b16" (the paper's towers at 384x128).
        layers: tower and cross-modal depth of the scaled shape.
        width: width of the scaled shape.
        precision: Accelerate's mixed precision ("no", "bf16", "fp16").
        device: "cpu" or "cuda".
        warmup: untimed steps first (the first allocates Adam's state).
        timed: timed steps; the memory is that of one more step.

    Returns:
        ``seconds_per_sample`` (wall clock), ``cpu_seconds_per_sample`` (this process's CPU time: steadier
        than the wall clock on a shared machine), ``peak_bytes`` (whole process on the CPU, allocated
        tensors on CUDA), ``step_growth_bytes`` (peak minus the memory at the step's start), ``losses`` of
        every step, ``num_params``.
    """
    import torch

    sizes = _shape(shape, layers, width)
    stepper = _Stepper(sizes, chunk_size, batch_size, precision, device)
    batch = _batch(sizes, batch_size, stepper.acc.device)
    cuda = stepper.acc.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    losses = [stepper.step(batch) for _ in range(warmup)]
    times, cpu_times = [], []
    for _ in range(timed):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(stepper.step(batch))
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        losses.append(stepper.step(batch))
        peak = torch.cuda.max_memory_allocated()
        growth = peak - base
    else:
        base = reset_peak_rss()
        losses.append(stepper.step(batch))
        growth = peak_rss_growth(base)
        peak = proc_kib("/proc/self/status", "VmHWM") * 1024
    return {"seconds_per_sample": statistics.median(times) / batch_size,
            "cpu_seconds_per_sample": statistics.median(cpu_times) / batch_size, "peak_bytes": peak,
            "step_growth_bytes": growth, "losses": losses, "num_params": stepper.num_params,
            "step_seconds": times}


def measure_vit_b16_per_sample(precision: str = "bf16", small: int = 1, large: int = 3) -> dict[str, Any]:
    """ViT-B/16 384x128 training memory per sample: step growth at `large` minus `small`, over the difference.

    Gradients are allocated before both measurements (zero_grad keeps them), so the growth is activations,
    the autocast weight copies and the step's transients; the copies cancel in the difference.
    """
    import torch

    from irra_dist.losses import irra_losses

    sizes = _shape("vit_b16")
    stepper = _Stepper(sizes, 0, large, precision, "cpu")

    def step(batch: dict) -> int:
        stepper.model.zero_grad(set_to_none=False)
        base = reset_peak_rss()
        rows, masked = batch["pids"].shape[0], int((batch["mlm_labels"] != 0).sum())
        losses = irra_losses(stepper.model(batch), batch, LOSS_NAMES,
                             normalizers={"batch": float(rows), "mlm": float(masked)})
        stepper.acc.backward(torch.stack(list(losses.values())).sum())
        return peak_rss_growth(base)

    step(_batch(sizes, small, stepper.acc.device))  # allocates the gradients
    grown = {n: step(_batch(sizes, n, stepper.acc.device)) for n in (small, large)}
    per_sample = (grown[large] - grown[small]) / (large - small)
    return {"per_sample_bytes": per_sample, "step_overhead_bytes": grown[small] - small * per_sample,
            "num_params": stepper.num_params, "growth": grown}


def measure_sdm_per_column_squared(columns: int = 2048, dim: int = 512) -> float:
    """Bytes per (global batch)^2 of the SDM loss forward + backward on fp32 features (pass 1's graph)."""
    import torch

    from irra_dist.losses import sdm_loss

    gen = torch.Generator().manual_seed(0)
    img = torch.randn(columns, dim, generator=gen, requires_grad=True)
    txt = torch.randn(columns, dim, generator=gen, requires_grad=True)
    pids = torch.arange(columns) // 2
    base = reset_peak_rss()
    sdm_loss(img, txt, pids, reduction="sum").backward()
    return peak_rss_growth(base) / columns ** 2


def project_24gib(vit: dict[str, Any], sdm_per_col2: float, chunk_sizes=(32, 64, 128)) -> list[dict]:
    """Largest global batch of ViT-B/16 384x128 on one 24 GiB GPU, unchunked and with chunks.

    Memory of a step = fixed (fp32 weights, gradients and Adam's two moments: 16 bytes per parameter; the
    measured per-step overhead; CUDA context) + rows on the device at once x per-sample memory + the whole
    batch's inputs (images 3x384x128 fp32 and three id rows) + SDM's (global batch)^2 term.
    """
    fixed = 16 * vit["num_params"] + max(vit["step_overhead_bytes"], 0) + CUDA_OVERHEAD
    per_sample = vit["per_sample_bytes"]
    inputs = 3 * 384 * 128 * 4 + 3 * 77 * 8 + 2 * 512 * 4  # images, ids/labels, cached features

    def fits(batch: int, chunk: int) -> bool:
        live = batch if chunk == 0 else min(chunk, batch)
        return fixed + live * per_sample + batch * inputs + sdm_per_col2 * batch ** 2 <= GPU_BYTES

    def largest(chunk: int) -> int:
        lo, hi = 0, 1
        while fits(hi, chunk):
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid, chunk) else (lo, mid)
        return lo

    rows = [{"chunk": 0, "largest_batch": largest(0)}]
    rows += [{"chunk": c, "largest_batch": largest(c)} for c in chunk_sizes]
    for row in rows:
        batch512 = fixed + min(row["chunk"] or 512, 512) * per_sample + 512 * inputs + sdm_per_col2 * 512 ** 2
        row["gib_at_512"] = batch512 / GIB
    return rows


CASES = {
    # (batch, chunk); quick: a smoke run of the same code at a narrow, shallow model and small batches.
    False: {"layers": 4, "width": 256, "cases": [(32, 0), (256, 0), (256, 32)]},
    True: {"layers": 1, "width": 64, "cases": [(4, 0), (16, 0), (16, 4)]},
}


def _worker_main(args: list[str]) -> dict:
    import torch

    kind, threads = args[0], int(args[1])
    torch.set_num_threads(threads)
    if kind == "step":
        batch, chunk, layers, *width = map(int, args[2:])
        return measure_step(batch, chunk, layers=layers, **({"width": width[0]} if width else {}))
    return {"vit": measure_vit_b16_per_sample(), "sdm_per_col2": measure_sdm_per_column_squared()}


def case_rows(results: dict[tuple[int, int], dict[str, Any]]) -> list[dict]:
    """Table rows of measured cases ``{(batch, chunk): measure_step result}``, in order: the first is the
    baseline of every ratio; the last two are compared for their losses (unchunked vs chunked)."""
    cases = list(results)
    base = results[cases[0]]
    mib = 2.0 ** -20
    metrics = [("time per sample", "seconds_per_sample", 1.0, "s", "wall clock: median step / batch"),
               ("CPU time per sample", "cpu_seconds_per_sample", 1.0, "s",
                "process CPU time: median step / batch"),
               ("peak memory", "peak_bytes", mib, "MiB", "process peak RSS during one step"),
               ("step growth", "step_growth_bytes", mib, "MiB", "peak RSS minus RSS at the step's start")]
    rows = []
    for case, r in results.items():
        label = f"batch {case[0]}" + (f" in chunks of {case[1]}" if case[1] else " unchunked")
        for what, key, scale, unit, method in metrics:
            if key in r and key in base:
                rows.append({"name": f"{label}: {what}", "value": r[key] * scale, "unit": unit,
                             "baseline": base[key] * scale, "ratio": r[key] / base[key], "method": method})
    plain, chunked = results[cases[-2]]["losses"], results[cases[-1]]["losses"]
    rel = max(abs(a - b) / abs(a) for a, b in zip(plain, chunked))
    rows.append({"name": f"batch {cases[-1][0]}: loss, chunked vs unchunked (max rel diff over steps)",
                 "value": rel, "unit": "", "baseline": None, "ratio": None,
                 "method": "same weights, same batch"})
    return rows


def projection_rows(proj: dict[str, Any]) -> list[dict]:
    """Table rows of the ViT-B/16 measurement and the 24 GiB projection."""
    vit, mib = proj["vit"], 2.0 ** -20
    rows = [{"name": "ViT-B/16 384x128 bf16: memory per sample", "value": vit["per_sample_bytes"] * mib,
             "unit": "MiB", "baseline": None, "ratio": None,
             "method": "measured: step growth (batch 3 - batch 1) / 2, CPU bf16 autocast"},
            {"name": "SDM memory per (global batch)^2", "value": proj["sdm_per_col2"], "unit": "B",
             "baseline": None, "ratio": None, "method": "measured: fwd+bwd at 2048 columns"}]
    for p in project_24gib(vit, proj["sdm_per_col2"]):
        what = f"chunks of {p['chunk']}" if p["chunk"] else "unchunked"
        rows.append({"name": f"24 GiB GPU, {what}: largest global batch", "value": p["largest_batch"],
                     "unit": "samples", "baseline": None, "ratio": None,
                     "method": f"projected; batch 512 needs {p['gib_at_512']:.1f} GiB"})
    return rows


def run(quick: bool, threads: int = 1, no_projection: bool = False) -> list[dict]:
    """Measure the cases of CASES, then (unless `no_projection` or `quick`) the ViT-B/16 projection.

    Returns:
        Rows with ``name``, ``value``, ``unit``, ``baseline`` (the smallest unchunked batch's value) and
        ``ratio`` (value / baseline: the goal for the chunked big batch is at most 1.3 for memory, 1.4 for
        time), then the projection rows.
    """
    setup = CASES[quick]
    results = {case: measure_in_subprocess(__file__, ["step", threads, *case, setup["layers"],
                                                      setup["width"]], env=MALLOC_ENV)
               for case in setup["cases"]}
    rows = case_rows(results)
    if not (quick or no_projection):
        rows += projection_rows(measure_in_subprocess(__file__, ["projection", threads], env=MALLOC_ENV))
    return rows


def _footer(rows: list[dict]) -> str:
    return ("ratio = value / the smallest unchunked batch's value (goal: the chunked big batch at most x1.3 "
            "memory, x1.4 time per sample); CPU timings are noisy on a shared machine: compare rows of one "
            "run")


def main(argv: list[str] | None = None) -> int:
    """Command line: print the table, optionally write the rows as JSON."""
    options = [("--threads", {"type": int, "default": 1, "help": "torch threads per worker (default 1)"}),
               ("--no-projection", {"action": "store_true", "help": "skip the ViT-B/16 measurement"})]
    return bench_main(run, __doc__, argv, extra_args=options, worker=_worker_main, footer=_footer,
                      extra_columns=("method",))


if __name__ == "__main__":
    sys.exit(main())
