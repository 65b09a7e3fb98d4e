"""One IRRA training step (forward + backward of SDM + ID + MLM) on the CPU: irra_dist vs the naive model.

Both variants are the same IRRA model with the same weights at a small configuration (width 256, 4 image
and 4 text layers, cross-modal depth 4, image 192x64, batch 16, 77 tokens, the real 49,408-token
vocabulary so that the MLM head costs what it costs in IRRA; ``--quick``: 2 + 2 layers, depth 2, batch 8):

- ``irra_dist``: attention through ``F.scaled_dot_product_attention``, MLM head only at the masked
  positions, one text-tower pass (the masked captions carried once, as caption_ids: the official aliasing);
- ``naive`` (the baseline, the official computation): explicit softmax attention as nn.MultiheadAttention
  did in PyTorch 1.9, MLM head at all B*77 positions, and the text tower run twice (once for the global
  feature, once for the IRR branch; here as one pass over the 2B stacked rows).

Rows: median step time (zero_grad, forward, losses, backward; no optimizer step), the peak memory of the step,
and the peak memory of the MLM head alone (head + cross-entropy, forward and backward, from the fused
[B*77, D] features). Peak memory is MEASURED as the growth of the process's resident set (VmHWM after
resetting it through /proc/self/clear_refs, minus VmRSS just before), with glibc's mmap threshold pinned
so that freed tensors return to the OS; parameter gradients are allocated beforehand, so the figure is
activation memory. The analytic size of the fp32 logits is reported beside it. Each measurement runs in
a fresh subprocess; the loss of both variants is printed to show they compute the same thing.

Usage: python bench/bench_model_step.py [--quick] [--json PATH] [--threads N]
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

from common import (
    BASELINE,
    VARIANTS,
    bench_main,
    measure_in_subprocess,
    peak_rss_growth,
    reset_peak_rss,
    variant_batch,
)

CLIP_SIZES = dict(embed_dim=256, image_size=(192, 64), patch_size=16, stride_size=16, vision_width=256,
                  vision_heads=4, context_length=77, vocab_size=49408, text_width=256, text_heads=4)
NUM_CLASSES = 11003  # CUHK-PEDES training identities
# Pin glibc's mmap threshold: large tensors are then mmapped and unmapped on free, so RSS tracks them.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """The depth of the model, the batch and the steps of one run (the widths are CLIP_SIZES)."""

    layers: int
    """Image and text tower layers each."""
    cmt_depth: int
    batch_size: int
    warmup: int
    timed: int

    @property
    def clip_sizes(self) -> dict:
        """Keyword arguments of build_irra for the towers."""
        return {**CLIP_SIZES, "vision_layers": self.layers, "text_layers": self.layers}

    @property
    def label(self) -> str:
        """The configuration in a few words, for the rows."""
        height, width = CLIP_SIZES["image_size"]
        return (f"w{CLIP_SIZES['vision_width']} {self.layers}+{self.layers} layers cmt{self.cmt_depth} "
                f"{height}x{width} V{CLIP_SIZES['vocab_size']}")


SETUPS = {
    False: StepSetup(layers=4, cmt_depth=4, batch_size=16, warmup=2, timed=10),
    # Shallower and half the batch: the quick run is a smoke run that must stay well under a minute.
    True: StepSetup(layers=2, cmt_depth=2, batch_size=8, warmup=1, timed=2),
}


def _make_batch(batch_size: int):
    """Synthetic captions of 15..45 words, masked with the official 15/80/10/10 rule (irra_dist.masking)."""
    import torch

    from irra_dist.masking import mask_tokens
    from irra_dist.tokenizer import EOT_ID, MASK_ID, SOT_ID

    gen = torch.Generator().manual_seed(0)
    length = CLIP_SIZES["context_length"]
    caption = torch.zeros(batch_size, length, dtype=torch.long)
    words = torch.randint(15, 46, (batch_size,), generator=gen)
    for row, n in enumerate(words.tolist()):
        caption[row, 0] = SOT_ID
        caption[row, 1:n + 1] = torch.randint(1, MASK_ID, (n,), generator=gen)
        caption[row, n + 1] = EOT_ID
    masked = [mask_tokens(c, generator=gen) for c in caption]
    mlm_ids = torch.stack([m for m, _ in masked])
    labels = torch.stack([lab for _, lab in masked])
    # The official batch: the masked captions feed every branch (IRRA_SPEC 3.3); variant_batch gives them
    # to irra_dist once, to the naive variant twice.
    return {"images": torch.randn(batch_size, 3, *CLIP_SIZES["image_size"], generator=gen),
            "caption_ids": mlm_ids, "mlm_ids": mlm_ids, "mlm_labels": labels,
            "pids": torch.arange(batch_size) // 2}


def _build(variant: str, setup: StepSetup):
    import torch

    from irra_dist.model import build_irra

    torch.manual_seed(0)  # same weights for both variants
    return build_irra(NUM_CLASSES, cmt_depth=setup.cmt_depth, **VARIANTS[variant], **setup.clip_sizes)


def _worker(variant: str, setup: StepSetup) -> dict:
    """Measure one variant: the MLM head alone first, then full training steps."""
    model = _build(variant, setup).train()
    batch = variant_batch(_make_batch(setup.batch_size), variant)
    return {"head": _measure_mlm_head(model, batch, variant), "step": _measure_step(model, batch, setup)}


def _measure_step(model, batch: dict, setup: StepSetup) -> dict:
    """Median time of full training steps and the peak memory of one step."""
    from irra_dist.losses import irra_losses

    def step() -> float:
        model.zero_grad(set_to_none=False)  # keep gradient buffers: the peak is then activations only
        loss = sum(irra_losses(model(batch), batch, ("sdm", "id", "mlm")).values())
        loss.backward()
        return loss.item()

    for _ in range(setup.warmup):
        step()
    times = []
    for _ in range(setup.timed):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    base = reset_peak_rss()
    step()
    return {"seconds": statistics.median(times), "all_seconds": times, "peak_bytes": peak_rss_growth(base),
            "loss": loss, "masked_positions": int((batch["mlm_labels"] != 0).sum())}


def _measure_mlm_head(model, batch: dict, variant: str) -> dict:
    """Peak memory and time of the MLM head + cross-entropy (forward and backward) from fused features."""
    import torch
    import torch.nn.functional as F

    head = model.mlm_head
    labels = batch["mlm_labels"].reshape(-1)
    fused = torch.randn(labels.shape[0], CLIP_SIZES["embed_dim"], generator=torch.Generator().manual_seed(1),
                        requires_grad=True)
    masked_only = VARIANTS[variant]["mlm_logits_at_masked_only"]

    def head_step() -> None:
        head.zero_grad(set_to_none=False)
        x, y = (fused[labels != 0], labels[labels != 0]) if masked_only else (fused, labels)
        F.cross_entropy(head(x), y, ignore_index=0).backward()

    head_step()  # allocates the parameter gradients outside the measurement
    fused.grad = None
    model.zero_grad(set_to_none=True)
    base = reset_peak_rss()
    start = time.perf_counter()
    head_step()
    seconds = time.perf_counter() - start
    positions = int((labels != 0).sum()) if masked_only else labels.shape[0]
    return {"peak_bytes": peak_rss_growth(base), "seconds": seconds,
            "logits_bytes": positions * CLIP_SIZES["vocab_size"] * 4, "positions": positions}


def _measure(variant: str, quick: bool, threads: int) -> dict:
    """Run a worker in a fresh interpreter so that peaks and caches never leak between measurements."""
    return measure_in_subprocess(__file__, [variant, str(int(quick)), str(threads)], env=MALLOC_ENV)


def _worker_main(args: list[str]) -> dict:
    import torch

    variant, quick, threads = args
    torch.set_num_threads(int(threads))
    return _worker(variant, SETUPS[bool(int(quick))])


def run(quick: bool, threads: int = 1) -> list[dict]:
    """Measure both variants; rows carry ``value`` (irra_dist), ``baseline`` (naive) and ``ratio``.

    Args:
        quick: the smaller setup of SETUPS (2 + 2 layers, cross-modal depth 2, batch 8) and 1 warm-up +
            2 timed steps instead of 2 + 10; well under a minute.
        threads: torch intra-op threads in each worker (1 keeps timings stable on a shared machine).

    Returns:
        Rows with ``name``, ``value``, ``unit``, ``baseline``, ``ratio`` (baseline / value: above 1 means
        irra_dist is faster or smaller), plus ``method`` and details.
    """
    results = {v: _measure(v, quick, threads) for v in VARIANTS}
    step = {v: r["step"] for v, r in results.items()}
    head = {v: r["head"] for v, r in results.items()}
    ours, base = "irra_dist", BASELINE
    setup = SETUPS[quick]
    shared = {"threads": threads, "batch_size": setup.batch_size, "config": setup.label,
              "loss": step[ours]["loss"], "baseline_loss": step[base]["loss"],
              "masked_positions": step[ours]["masked_positions"]}

    def row(name: str, value: float, baseline: float, unit: str, method: str, **extra) -> dict:
        return {"name": name, "value": value, "unit": unit, "baseline": baseline,
                "ratio": baseline / value if value > 0 else None, "method": method, **shared, **extra}

    mib = 2.0 ** -20
    return [
        row("train step fwd+bwd (median)", step[ours]["seconds"], step[base]["seconds"], "s",
            f"wall clock, median of {setup.timed} steps after {setup.warmup} warm-up",
            step_seconds=step[ours]["all_seconds"], baseline_step_seconds=step[base]["all_seconds"]),
        row("train step peak activations", step[ours]["peak_bytes"] * mib, step[base]["peak_bytes"] * mib,
            "MiB", "measured: resident-set growth during one step"),
        row("MLM head fwd+bwd peak", head[ours]["peak_bytes"] * mib, head[base]["peak_bytes"] * mib, "MiB",
            f"measured: resident-set growth, {head[ours]['positions']} vs {head[base]['positions']} "
            "positions"),
        row("MLM logits size (analytic)", head[ours]["logits_bytes"] * mib, head[base]["logits_bytes"] * mib,
            "MiB", "computed: positions x 49408 x 4 bytes"),
        row("MLM head fwd+bwd time", head[ours]["seconds"], head[base]["seconds"], "s",
            "wall clock, one call"),
    ]


def _footer(rows: list[dict]) -> str:
    first = rows[0]
    return (f"ratio = naive / irra_dist; {first['config']}, batch {first['batch_size']}, "
            f"{first['masked_positions']} masked positions, {first['threads']} thread(s); "
            f"loss {first['loss']:.5f} (irra_dist) vs {first['baseline_loss']:.5f} (naive)")


def main(argv: list[str] | None = None) -> int:
    """Command line: print the table, optionally write the rows as JSON."""
    options = [("--threads", {"type": int, "default": 1, "help": "torch threads per worker (default 1)"})]
    return bench_main(run, __doc__, argv, extra_args=options, worker=_worker_main, footer=_footer,
                      labels={"value": "irra_dist", "baseline": "naive"}, extra_columns=("method",))


if __name__ == "__main__":
    sys.exit(main())
