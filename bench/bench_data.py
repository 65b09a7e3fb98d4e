"""Data pipeline throughput: training samples/s per worker from shards vs. an official-style loader.

Run: ``python bench/bench_data.py [--quick] [--json PATH]``. On a synthetic CUHK-layout dataset:

- ``train pipeline`` rows: samples/s through the whole training path (read, decode, Resize, flip, pad+crop,
  normalise, random erasing, tokenise, MLM mask, collate) in ONE process (``num_workers=0``, so the figure
  is per worker), from shards with the original JPEG bytes and from shards pre-resized to 384x128
  (lossless PNG, and raw PPM).
  Baseline: the official loader's way, a torch Dataset over the parsed JSON annotation that opens each
  image file with PIL and applies the same torchvision transforms, tokenisation and masking.
- ``shard build`` rows: images/s written by ``build_shards`` with 1 and 2 workers, original bytes and
  pre-resized; baseline: Python's ``tarfile.add`` of the same files (1 thread, original bytes only).
  The synthetic images are small (about 110x290 JPEGs of 8 KiB), like CUHK-PEDES's.
"""

from __future__ import annotations

import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from common import bench_main
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from irra_dist.data import transforms as tr
from irra_dist.data.parsers import ParsedDataset, parse_dataset
from irra_dist.data.pipeline import TrainLoader
from irra_dist.data.shards import build_shards
from irra_dist.data.synthetic import generate_synthetic_dataset
from irra_dist.masking import mask_tokens
from irra_dist.tokenizer import default_tokenizer, tokenize

IMAGE_SIZE = (384, 128)
BATCH = 32
FORMATS = {"original": "original JPEG", "png": "pre-resized PNG", "ppm": "pre-resized PPM"}


class OfficialStyleDataset(Dataset):
    """The official ImageTextMLMDataset's work per sample: PIL open of a file, transforms, tokenise, mask."""

    def __init__(self, parsed: ParsedDataset) -> None:
        self.samples = parsed.train_samples()
        try:
            from torchvision import transforms as T
        except ImportError:  # the same algorithm from irra_dist, drawing from the global generator
            self.transform = lambda img: tr.train_transform(img, torch.default_generator, IMAGE_SIZE)
        else:
            self.transform = T.Compose([
                T.Resize(IMAGE_SIZE), T.RandomHorizontalFlip(0.5), T.Pad(10), T.RandomCrop(IMAGE_SIZE),
                T.ToTensor(), T.Normalize(tr.CLIP_MEAN, tr.CLIP_STD),
                T.RandomErasing(scale=(0.02, 0.4), value=tr.CLIP_MEAN)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        pid, image_id, path, caption = self.samples[i]
        image = self.transform(Image.open(path).convert("RGB"))
        caption_ids = tokenize(caption)
        mlm_ids, mlm_labels = mask_tokens(caption_ids)
        return {"pids": pid, "image_ids": image_id, "images": image, "caption_ids": mlm_ids,
                "mlm_ids": mlm_ids, "mlm_labels": mlm_labels}


def _samples_per_s(batches, limit: int) -> float:
    """Samples/s over batches after the first (warm-up), stopping after `limit` samples."""
    iterator = iter(batches)
    next(iterator)
    count, start = 0, time.perf_counter()
    for batch in iterator:
        count += len(batch["pids"])
        if count >= limit:
            break
    return count / (time.perf_counter() - start)


def _build_rate(parsed: ParsedDataset, out: Path, **kwargs) -> float:
    images = sum(len(r) for r in parsed.splits.values())
    start = time.perf_counter()
    build_shards(parsed, None, out, progress=False, overwrite=True, **kwargs)
    return images / (time.perf_counter() - start)


def _tarfile_rate(parsed: ParsedDataset, out: Path) -> float:
    records = [r for split in parsed.splits.values() for r in split]
    start = time.perf_counter()
    with tarfile.open(out, "w") as tar:
        for i, record in enumerate(records):
            tar.add(record.path, arcname=f"{i:08d}.jpg")
    return len(records) / (time.perf_counter() - start)


def run(quick: bool) -> list[dict]:
    """Measure the data pipeline; returns bench rows (name, value, unit, baseline, ratio).

    Args:
        quick: about 250 training samples measured per row instead of about 1,000.
    """
    torch.set_num_threads(1)
    default_tokenizer()
    num_ids = 50 if quick else 200
    limit = 250 if quick else 1000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_synthetic_dataset(root / "CUHK-PEDES", num_train_ids=num_ids, num_val_ids=0,
                                   num_test_ids=max(1, num_ids // 10), seed=0, workers=2)
        parsed = parse_dataset("CUHK-PEDES", root)

        tar_rate = _tarfile_rate(parsed, root / "plain.tar")
        for workers in (1, 2):
            for fmt in FORMATS:
                size = None if fmt == "original" else IMAGE_SIZE
                rate = _build_rate(parsed, root / f"shards_{workers}_{fmt}", workers=workers, pre_resize=size,
                                   pre_resize_format="png" if size is None else fmt)
                rows.append({"name": f"shard build, {FORMATS[fmt]}, {workers} worker(s)", "value": rate,
                             "unit": "images/s", "baseline": tar_rate, "ratio": rate / tar_rate})

        official = DataLoader(OfficialStyleDataset(parsed), batch_size=BATCH, shuffle=True, num_workers=0)
        baseline = _samples_per_s(official, limit)
        for fmt, label in FORMATS.items():
            loader = TrainLoader(root / f"shards_1_{fmt}", global_batch_size=BATCH, image_size=IMAGE_SIZE,
                                 num_workers=0)
            rate = _samples_per_s(loader, limit)
            rows.append({"name": f"train pipeline, shards of {label}, 0 workers", "value": rate,
                         "unit": "samples/s", "baseline": baseline, "ratio": rate / baseline})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line: print the table, optionally write the rows as JSON."""
    return bench_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
