"""The full IRRA training step on one GPU at the paper's shape: samples/s, peak memory, MFU, eval throughput.

`python bench/gpu_step.py [--json PATH] [--compile] [--peak-tflops T]` on a CUDA machine;
`python bench/gpu_step.py --dry-run` runs the same code on the CPU at a tiny shape in a few seconds.

What one step is: ViT-B/16 image tower at 384x128 stride 16, 12-layer 512-wide text tower, a 4-layer
cross-modal module, 11003-way ID classifier, SDM + ID + MLM losses, random weights, bf16 autocast over fp32
weights (so the fp32 weights are the master copy), Adam with the official parameter groups, batch 64. Two
variants run side by side:

- ``irra_dist``: fused attention (``F.scaled_dot_product_attention``), MLM logits at the masked positions
  only, one text-tower pass (the global text feature is read from the masked caption, as the official code
  does through its aliasing);
- ``naive``: the official code's compute: attention as ``nn.MultiheadAttention`` computes it (explicit
  softmax), MLM logits at all B x 77 positions, the caption and the masked caption each through the text
  tower.

MFU uses the explicit FLOP count of bench/flops.py. Both variants are credited with the ``irra_dist``
count (the useful work); the naive variant's extra text pass and full-vocabulary head are not counted as
useful. Evaluation throughput times ``encode_image`` / ``encode_text`` at batch 512 under ``no_grad`` and
bf16 autocast (eager, also with ``--compile``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import BASELINE, MASKED_CAPTIONS_ONCE, VARIANTS, format_table, variant_batch, write_json
from flops import IrraShape, forward_macs, peak_bf16_tflops, training_flops

from irra_dist.losses import irra_losses
from irra_dist.masking import mask_tokens
from irra_dist.model import IRRA, build_irra
from irra_dist.model.clip import ClipSizes
from irra_dist.optim import build_optimizer
from irra_dist.tokenizer import EOT_ID, MASK_ID, SOT_ID

logger = logging.getLogger("bench.gpu_step")

LOSS_NAMES = ("sdm", "id", "mlm")
# CUHK-PEDES recipe: 68,126 training captions per epoch, 60 epochs (IRRA_SPEC 3.5, 9).
EPOCH_SAMPLES = 68_126
NUM_EPOCHS = 60
# Maskable BPE tokens per caption: CUHK-PEDES captions average about 23.5 words, plus punctuation and
# sub-word splits; only sets how many positions the masked-only MLM head sees (about 4 per caption).
CAPTION_TOKENS = 28

class NoGpuError(RuntimeError):
    """The benchmark needs CUDA; the message says how to run the CPU dry run instead."""


@dataclasses.dataclass(frozen=True)
class BenchSetup:
    """Sizes and repetitions of one benchmark run."""

    clip_sizes: dict[str, Any]
    cmt_depth: int
    num_classes: int
    batch_size: int
    steps: int
    warmup: int
    eval_batch_size: int
    eval_steps: int

    @property
    def shape(self) -> IrraShape:
        """The FLOP-count view of these sizes."""
        return IrraShape.from_sizes(self.clip_sizes, self.cmt_depth, self.num_classes)


# ClipSizes' defaults are the paper's ViT-B/16 towers.
PAPER_SIZES: dict[str, Any] = dataclasses.asdict(ClipSizes())
# Tiny towers for the CPU dry run; the vocabulary stays full size because the token ids must fit it.
TINY_SIZES: dict[str, Any] = {
    **PAPER_SIZES,
    "embed_dim": 32,
    "image_size": (32, 16),
    "patch_size": 8,
    "stride_size": 8,
    "vision_width": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "text_width": 32,
    "text_heads": 2,
    "text_layers": 1,
}


def paper_setup(
    batch_size: int = 64, steps: int = 20, warmup: int = 5, eval_batch_size: int = 512, eval_steps: int = 10
) -> BenchSetup:
    """The paper's shape: ViT-B/16 at 384x128, 11003 identities (CUHK-PEDES); batch 64, evaluation at 512."""
    return BenchSetup(
        PAPER_SIZES,
        cmt_depth=4,
        num_classes=11003,
        batch_size=batch_size,
        steps=steps,
        warmup=warmup,
        eval_batch_size=eval_batch_size,
        eval_steps=eval_steps,
    )


def dry_run_setup() -> BenchSetup:
    """A shape small enough for a CPU run of a few seconds."""
    return BenchSetup(
        TINY_SIZES,
        cmt_depth=1,
        num_classes=16,
        batch_size=4,
        steps=1,
        warmup=1,
        eval_batch_size=8,
        eval_steps=1,
    )


def make_batch(
    setup: BenchSetup, device: torch.device, generator: torch.Generator, caption_tokens: int = CAPTION_TOKENS
) -> dict[str, torch.Tensor]:
    """A random training batch with the model's keys: two captions per identity, masked as in training.

    `caption_ids` holds the clean captions and `mlm_ids` the masked ones; ``common.variant_batch`` gives the
    ``irra_dist`` variant the masked ones as `caption_ids` (official aliasing), the naive one encodes both.
    """
    b, length = setup.batch_size, setup.clip_sizes["context_length"]
    height, width = setup.clip_sizes["image_size"]
    content = min(caption_tokens, length - 2)
    ids = torch.zeros(b, length, dtype=torch.long)
    ids[:, 0] = SOT_ID
    ids[:, 1 : content + 1] = torch.randint(1, MASK_ID, (b, content), generator=generator)
    ids[:, content + 1] = EOT_ID
    mlm_ids, mlm_labels = mask_tokens(ids, generator)
    batch = {
        "images": torch.randn(b, 3, height, width, generator=generator),
        "caption_ids": ids,
        "pids": (torch.arange(b) // 2) % setup.num_classes,
        "mlm_ids": mlm_ids,
        "mlm_labels": mlm_labels,
    }
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of `fn`, after `warmup` untimed calls; one synchronisation at each end only."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _time_training(
    model: torch.nn.Module,
    setup: BenchSetup,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    extra_warmup: int,
    amp_dtype: torch.dtype = torch.bfloat16,
) -> tuple[float, int | None]:
    """Seconds per optimizer step and peak allocated bytes (weights, Adam state, activations; CUDA only).

    fp16 autocast comes with a gradient scaler on CUDA, as Accelerate adds one for fp16 training."""
    optimizer = build_optimizer(model)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and device.type == "cuda")

    def train_step() -> None:
        with torch.autocast(device.type, dtype=amp_dtype):
            loss = sum(irra_losses(model(batch), batch, LOSS_NAMES).values())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = _timed(train_step, setup.steps, setup.warmup + extra_warmup, device)
    return step_s, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _time_encoders(
    model: IRRA, setup: BenchSetup, device: torch.device, generator: torch.Generator
) -> tuple[float, float]:
    """Seconds per encode_image and per encode_text call at the evaluation batch size."""
    batch = make_batch(dataclasses.replace(setup, batch_size=setup.eval_batch_size), device, generator)
    model.eval()
    eval_warmup = min(setup.warmup, 2)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        image_s = _timed(lambda: model.encode_image(batch["images"]), setup.eval_steps, eval_warmup, device)
        text_s = _timed(
            lambda: model.encode_text(batch["caption_ids"]), setup.eval_steps, eval_warmup, device
        )
    return image_s, text_s


def bench_variant(
    setup: BenchSetup, variant: str, device: torch.device, *, compile_model: bool, seed: int = 0,
    amp_dtype: torch.dtype = torch.bfloat16,
) -> dict[str, Any]:
    """Time the training step and the two encoders of one variant; returns its raw measurements."""
    options = VARIANTS[variant]
    torch.manual_seed(seed)
    model = build_irra(setup.num_classes, cmt_depth=setup.cmt_depth, **options, **setup.clip_sizes).to(device)
    generator = torch.Generator().manual_seed(seed)
    batch = variant_batch(make_batch(setup, device, generator), variant)
    # Positions the MLM head runs at, for the FLOP count (read once here, outside the timed loop).
    masked = int((batch["mlm_labels"] != 0).sum())
    head_positions = masked if options["mlm_logits_at_masked_only"] else batch["mlm_labels"].numel()
    text_passes = 1 if MASKED_CAPTIONS_ONCE[variant] else 2
    if compile_model:
        # In place: model(...) now runs the compiled forward; encode_* stay eager.
        model.compile()
    # Compilation happens in the first calls: give it more untimed steps.
    step_s, peak_bytes = _time_training(model, setup, batch, device, extra_warmup=3 if compile_model else 0,
                                        amp_dtype=amp_dtype)
    image_s, text_s = _time_encoders(model, setup, device, generator)
    del model, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    macs = forward_macs(setup.shape, setup.batch_size, mlm_positions=head_positions, text_passes=text_passes)
    return {
        "step_s": step_s,
        "samples_per_s": setup.batch_size / step_s,
        "peak_bytes": peak_bytes,
        "images_per_s": setup.eval_batch_size / image_s,
        "captions_per_s": setup.eval_batch_size / text_s,
        "masked_positions": masked,
        "flops": training_flops(macs),
    }


def _row(
    name: str, value: float, unit: str, baseline: float | None, higher_is_better: bool, **extra: Any
) -> dict[str, Any]:
    """A bench row; `ratio` > 1 means irra_dist is better (faster, smaller) than the naive baseline."""
    if baseline is None or value == 0 or baseline == 0:
        ratio = None
    else:
        ratio = value / baseline if higher_is_better else baseline / value
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "ratio": ratio,
        "better": "higher" if higher_is_better else "lower",
        **extra,
    }


def make_rows(
    setup: BenchSetup, results: dict[str, dict[str, Any]], device_name: str, peak_tflops: float | None
) -> list[dict[str, Any]]:
    """The table: per-step and per-sample figures of irra_dist with the naive variant as baseline."""
    ours, base = results["irra_dist"], results[BASELINE]
    b = setup.batch_size
    extra = {"device": device_name, "batch_size": b, "mlm_masked_positions": ours["masked_positions"]}
    useful_flops = ours["flops"]["total"]
    rows = [
        _row("train_step_time", ours["step_s"] * 1e3, "ms", base["step_s"] * 1e3, False, **extra),
        _row("train_samples_per_s", ours["samples_per_s"], "samples/s", base["samples_per_s"], True, **extra),
    ]
    if ours["peak_bytes"] is not None:
        rows.append(
            _row(
                "train_peak_gpu_memory",
                ours["peak_bytes"] / 2**30,
                "GiB",
                base["peak_bytes"] / 2**30,
                False,
                **extra,
            )
        )
    rows.append(
        _row(
            "train_useful_tflops_per_s",
            useful_flops / ours["step_s"] / 1e12,
            "TFLOP/s",
            useful_flops / base["step_s"] / 1e12,
            True,
            **extra,
        )
    )
    if peak_tflops:
        rows.append(
            _row(
                "train_mfu",
                100 * useful_flops / ours["step_s"] / (peak_tflops * 1e12),
                "%",
                100 * useful_flops / base["step_s"] / (peak_tflops * 1e12),
                True,
                peak_tflops=peak_tflops,
                **extra,
            )
        )
    for component, flops in ours["flops"].items():
        rows.append(
            _row(
                f"train_gflop_per_sample_{component}",
                flops / b / 1e9,
                "GFLOP",
                base["flops"][component] / b / 1e9,
                False,
                **extra,
            )
        )
    rows += [
        _row(
            "epoch60_projection",
            EPOCH_SAMPLES * NUM_EPOCHS / ours["samples_per_s"] / 3600,
            "h",
            EPOCH_SAMPLES * NUM_EPOCHS / base["samples_per_s"] / 3600,
            False,
            **extra,
        ),
        _row(
            "eval_encode_image",
            ours["images_per_s"],
            "images/s",
            base["images_per_s"],
            True,
            device=device_name,
            batch_size=setup.eval_batch_size,
        ),
        _row(
            "eval_encode_text",
            ours["captions_per_s"],
            "captions/s",
            base["captions_per_s"],
            True,
            device=device_name,
            batch_size=setup.eval_batch_size,
        ),
    ]
    return rows


def benchmark(
    setup: BenchSetup, device: torch.device, *, compile_model: bool = False, peak_tflops: float | None = None,
    amp_dtype: torch.dtype = torch.bfloat16,
) -> list[dict[str, Any]]:
    """Run both variants on `device` and return the rows; `peak_tflops` None looks the GPU up; `amp_dtype`
    is the training step's autocast type (the encoders are timed in bf16)."""
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        peak_tflops = peak_tflops or peak_bf16_tflops(device_name)
        if peak_tflops is None:
            logger.warning("%s is not in the peak-FLOP table: pass --peak-tflops for MFU", device_name)
    else:
        device_name = "cpu"
    results = {}
    for variant in VARIANTS:
        logger.info("%s: %s", variant, VARIANTS[variant])
        results[variant] = bench_variant(setup, variant, device, compile_model=compile_model,
                                         amp_dtype=amp_dtype)
    return make_rows(setup, results, device_name, peak_tflops)


def _cuda_device() -> torch.device:
    if not torch.cuda.is_available():
        raise NoGpuError("no CUDA device: run bench/gpu_step.py on a GPU machine, or --dry-run on the CPU")
    return torch.device("cuda", torch.cuda.current_device())


def run(quick: bool) -> list[dict[str, Any]]:
    """The common bench interface (bench/run_all.py --gpu): the paper-shape step on the current GPU."""
    setup = paper_setup(steps=5, warmup=2, eval_steps=2) if quick else paper_setup()
    return benchmark(setup, _cuda_device())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shape on the CPU in seconds (CI smoke test)"
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: the paper shape on the CPU (slow; pair with a small --batch-size)",
    )
    parser.add_argument("--quick", action="store_true", help="5 timed steps after 2 warm-up (else --steps)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch (default 64, the paper's)")
    parser.add_argument("--eval-batch-size", type=int, default=512, help="encode_image/encode_text batch")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps before timing")
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s (GPUs not in the table)")
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.batch_size < 2 or args.eval_batch_size < 1 or args.steps < 1 or args.warmup < 0:
        parser.error(
            "need --batch-size >= 2 (SDM needs pairs), --eval-batch-size >= 1, --steps >= 1, --warmup >= 0"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or the CPU dry run), print the table and optionally write the JSON."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dry_run:
        setup, device = dry_run_setup(), torch.device("cpu")
    else:
        if args.device == "cuda":
            try:
                device = _cuda_device()
            except NoGpuError as exc:
                logger.error("error: %s", exc)
                return 2
        else:
            device = torch.device("cpu")
        steps, warmup = (5, 2) if args.quick else (args.steps, args.warmup)
        setup = paper_setup(
            batch_size=args.batch_size,
            steps=steps,
            warmup=warmup,
            eval_batch_size=args.eval_batch_size,
            eval_steps=max(1, steps // 2),
        )
    rows = benchmark(setup, device, compile_model=args.compile, peak_tflops=args.peak_tflops)
    print(format_table(rows, labels={"value": "irra_dist", "baseline": "naive"}))
    if args.json is not None:
        write_json(args.json, rows)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
