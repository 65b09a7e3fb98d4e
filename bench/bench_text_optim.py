"""Throughput of tokenisation, MLM masking and the optimizer step against official-style baselines.

Baselines follow the official IRRA code paths (written here, not imported): per-caption tokenisation into a
fresh tensor with string-valued BPE cache, per-position Python-loop masking with the `random` module, and
Adam with one parameter group per tensor.

Usage: python bench/bench_text_optim.py [--quick] [--json PATH]; ratio > 1 means irra_dist is faster.
"""

from __future__ import annotations

import random
import sys
import time

import numpy as np
import torch
from common import bench_main
from torch import nn

from irra_dist.config import OptimConfig
from irra_dist.masking import mask_tokens
from irra_dist.optim import build_optimizer, param_settings
from irra_dist.tokenizer import (
    _PATTERN,
    EOT_ID,
    MASK_ID,
    SOT_ID,
    clean_text,
    default_tokenizer,
    tokenize,
)

WORDS = ("a man woman person wearing red blue black white shirt jacket pants jeans shoes carrying bag "
         "backpack walking hair long short glasses hat dress skirt holding umbrella phone striped").split()


def _captions(n: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60))) + "." for _ in range(n)]


def _official_tokenize(captions: list[str]) -> torch.Tensor:
    tok = default_tokenizer()
    cache: dict[str, str] = {}
    rows = []
    for caption in captions:
        ids = []
        for word in _PATTERN.findall(clean_text(caption)):
            word = "".join(tok.byte_encoder[b] for b in word.encode("utf-8"))
            if word not in cache:
                cache[word] = " ".join(tok.bpe(word))
            ids.extend(tok.encoder[s] for s in cache[word].split(" "))
        tokens = [SOT_ID, *ids, EOT_ID]
        if len(tokens) > 77:
            tokens = tokens[:77]
            tokens[-1] = EOT_ID
        row = torch.zeros(77, dtype=torch.long)
        row[:len(tokens)] = torch.tensor(tokens)
        rows.append(row)
    return torch.stack(rows)


def _official_mask(tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    labels = []
    for i, token in enumerate(tokens):
        if 0 < token < MASK_ID:
            prob = random.random()
            if prob < 0.15:
                prob /= 0.15
                if prob < 0.8:
                    tokens[i] = MASK_ID
                elif prob < 0.9:
                    tokens[i] = random.choice(range(1, MASK_ID))
                labels.append(token)
            else:
                labels.append(0)
        else:
            labels.append(0)
    if all(label == 0 for label in labels):
        labels[1] = tokens[1]
        tokens[1] = MASK_ID
    return torch.tensor(tokens), torch.tensor(labels)


def _timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class _ManyTensors(nn.Module):
    """About as many parameter tensors as IRRA ViT-B/16 (~370), with official-style names."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        block = lambda: nn.TransformerEncoderLayer(width, 4, 4 * width)
        self.base_model = nn.ModuleDict({"visual": nn.Sequential(*[block() for _ in range(layers)]),
                                         "transformer": nn.Sequential(*[block() for _ in range(layers)])})
        self.cross_modal_transformer = nn.Sequential(*[block() for _ in range(4)])
        self.classifier = nn.Linear(width, 1000)
        self.mlm_head = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.Linear(width, 4096))


def run(quick: bool) -> list[dict]:
    """Measure and return the rows (name, value, unit, baseline, ratio); ratio > 1: irra_dist is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both sides single-threaded, as in one data-loader worker
    try:
        return _measure(quick)
    finally:
        torch.set_num_threads(threads)


def _measure(quick: bool) -> list[dict]:
    rows = []

    captions = _captions(2000 if quick else 20000)
    default_tokenizer()  # exclude the one-off vocabulary load
    _official_tokenize(captions[:50]), tokenize(captions[:50])
    ours = _timed(lambda: tokenize(captions))
    base = _timed(lambda: _official_tokenize(captions))
    assert torch.equal(tokenize(captions), _official_tokenize(captions))
    rows.append({"name": "tokenize", "value": len(captions) / ours, "unit": "captions/s",
                 "baseline": len(captions) / base, "ratio": base / ours})

    ids = tokenize(captions[: 2000 if quick else 10000])
    ids_np = ids.numpy()

    def ours_mask() -> None:
        for i in range(len(ids)):
            mask_tokens(ids[i], torch.Generator().manual_seed(i))

    def official_mask() -> None:
        for i in range(len(ids_np)):
            _official_mask(ids_np[i].copy())

    ours = _timed(ours_mask)
    base = _timed(official_mask)
    rows.append({"name": "mask_tokens (per sample, seeded generator)", "value": len(ids) / ours,
                 "unit": "captions/s", "baseline": len(ids) / base, "ratio": base / ours})
    batched = _timed(lambda: mask_tokens(ids, torch.Generator().manual_seed(0)))
    rows.append({"name": "mask_tokens (one [N,77] call)", "value": len(ids) / batched, "unit": "captions/s",
                 "baseline": len(ids) / base, "ratio": base / batched})

    model = _ManyTensors(width=128 if quick else 384, layers=6 if quick else 12)
    config = OptimConfig()
    grouped = build_optimizer(model, config)
    per_tensor = torch.optim.Adam(
        [{"params": [p], "lr": param_settings(n, config)[1], "weight_decay": param_settings(n, config)[2]}
         for n, p in model.named_parameters()], lr=config.lr, betas=config.betas, eps=config.eps)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    steps = 5 if quick else 20

    def stepper(opt):
        return lambda: [opt.step() for _ in range(steps)]

    stepper(grouped)(), stepper(per_tensor)()  # allocate state
    ours = _timed(stepper(grouped)) / steps
    base = _timed(stepper(per_tensor)) / steps
    n_tensors = sum(1 for _ in model.parameters())
    rows.append({"name": f"Adam step, {len(grouped.param_groups)} groups vs {n_tensors} (CPU)",
                 "value": ours * 1e3, "unit": "ms/step", "baseline": base * 1e3, "ratio": base / ours})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line: print the table, optionally write the rows as JSON."""
    return bench_main(run, __doc__, argv, labels={"value": "irra_dist", "baseline": "official-style"})


if __name__ == "__main__":
    sys.exit(main())
