"""Search latency with the gallery-feature cache against re-encoding the gallery for every search.

Run: ``python bench/bench_search.py [--quick] [--json PATH]``. One row per (model, gallery size): the wall
clock of one whole ``irra-search`` call (load the model, get the gallery features, encode the query,
rank, print, write the PNG grid) when the gallery features are already cached (value), against the same
call with an empty cache, which encodes every gallery image as the official visualize.py does (baseline).
The ratio is baseline / value: how many times faster a repeated search is. Models are random-init (only the
shape matters for time): the demo recipe's model at 96x32, and, without ``--quick``, ViT-B/16 at 384x128.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import bench_main

from irra_dist.config import load_config, save_config
from irra_dist.data.parsers import parse_dataset
from irra_dist.data.shards import build_shards
from irra_dist.engine.search_cli import main as search_main
from irra_dist.model import build_irra_from_config, save_weights_safetensors
from irra_dist.synthetic.dataset import generate_synthetic_dataset

QUERY = "a woman wearing a red coat and black trousers, carrying a blue backpack"


def _gallery(root: Path, num_test_ids: int) -> tuple[Path, int]:
    """A synthetic test split as shards under `root`; returns (shard folder, number of gallery images)."""
    dataset = root / "data" / "CUHK-PEDES"
    generate_synthetic_dataset(dataset, num_train_ids=1, num_val_ids=0, num_test_ids=num_test_ids, seed=0,
                               workers=2)
    parsed = parse_dataset("CUHK-PEDES", dataset.parent)
    build_shards(parsed, None, root / "shards", workers=2)
    return root / "shards", len(parsed.splits["test"])


def _run_folder(root: Path, name: str, overrides: list[str], shards: Path) -> Path:
    cfg = load_config("demo", [f"data.shards={shards}", *overrides])
    torch.manual_seed(0)
    model = build_irra_from_config(dataclasses.replace(cfg.model, pretrained="none"), 1, with_mlm=False)
    run = root / name
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    save_weights_safetensors(model, run / "model.safetensors")
    return run


def _search_seconds(run: Path, cache: Path) -> float:
    argv = ["--run", str(run), "--query", QUERY, "--top-k", "10", "--cache-dir", str(cache),
            "--out", str(run / "bench.png"), "--num-workers", "0", "--device", "cpu"]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        status = search_main(argv)
    elapsed = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"irra-search exited with {status} on {run}")
    return elapsed


def run(quick: bool) -> list[dict]:
    """Time cached against uncached searches; returns bench rows (name, value, unit, baseline, ratio).

    Args:
        quick: the demo model only, on a 40-identity gallery (about 120 images), median of 2 repeats.
            Otherwise the demo model on 100 identities (median of 3) and ViT-B/16 on 8 identities
            (about 25 images, one repeat: on a CPU each image costs it about a second).
    """
    vit_b16 = ["model.image_size=[384,128]", "model.stride_size=16", "model.patch_size=16",
               "model.embed_dim=512", "model.vision_width=768", "model.vision_layers=12",
               "model.vision_heads=12", "model.text_width=512", "model.text_layers=12", "model.text_heads=8"]
    # (label, recipe overrides, test identities in the gallery, repeats)
    cases = [("demo model 96x32", [], 40, 2)] if quick else [("demo model 96x32", [], 100, 3),
                                                              ("ViT-B/16 384x128", vit_b16, 8, 1)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for m, (label, overrides, num_ids, repeats) in enumerate(cases):
            shards, num_images = _gallery(root / f"gallery{m}", num_ids)
            folder = _run_folder(root, f"run{m}", overrides, shards)
            if m == 0:
                _search_seconds(folder, root / "warmup")  # imports, tokenizer, allocator
            cold = [_search_seconds(folder, root / f"cache{m}_{i}") for i in range(repeats)]
            warm = [_search_seconds(folder, root / f"cache{m}_0") for _ in range(max(repeats, 2))]
            value, baseline = statistics.median(warm), statistics.median(cold)
            rows.append({"name": f"search 1 query, {num_images} images, {label}", "value": value, "unit": "s",
                         "baseline": baseline, "ratio": baseline / value, "gallery_images": num_images})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line: print the table, optionally write the rows as JSON."""
    return bench_main(run, __doc__, argv, labels={"value": "cached", "baseline": "uncached"})


if __name__ == "__main__":
    sys.exit(main())
