"""``irra-build-shards``: a dataset (official annotation files, or ``--dataset jsonl``) to WebDataset shards.

The shard format, the builder and the readers are :mod:`irra_dist.data.shards`; this is the command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from irra_dist.data.jsonl import JSONL_NAME, parse_jsonl
from irra_dist.data.parsers import (
    SPLITS,
    DatasetError,
    DatasetNotFoundError,
    carve_val_identities,
    parse_dataset,
)
from irra_dist.data.shards import (
    DEFAULT_SHARD_SIZE,
    MANIFEST_NAME,
    PRE_RESIZE_FORMATS,
    ShardError,
    build_shards,
    index_shards,
)
from irra_dist.engine.cli import image_size_arg


def _arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irra-build-shards",
        description="Write a person-retrieval dataset as WebDataset tar shards plus manifest.json.")
    parser.add_argument("--dataset", help="CUHK-PEDES, ICFG-PEDES or RSTPReid (or an alias), or jsonl for "
                        "your own data (--ann, --images); with --index-only, the name recorded in the "
                        "manifest")
    parser.add_argument("--root", help="the dataset folder, or the data root holding it")
    parser.add_argument("--ann", help="--dataset jsonl: the annotation file, one JSON object per line: "
                        '{"image": "rel/path.jpg", "captions": ["..."], "pid": optional, "split": optional}')
    parser.add_argument("--images", help="--dataset jsonl: the folder the 'image' paths are relative to")
    parser.add_argument("--out", default=None, help="destination folder (default: shards/<dataset>)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads reading images (processes when pre-resizing)")
    parser.add_argument("--pre-resize", type=image_size_arg, default=None, metavar="HxW",
                        help="store images resized to HxW (bilinear, lossless), e.g. 384x128")
    parser.add_argument("--pre-resize-format", choices=PRE_RESIZE_FORMATS, default="png",
                        help="format of pre-resized images: png (compact) or ppm (raw RGB, fastest to load)")
    parser.add_argument("--val-ids", type=int, default=0, metavar="N",
                        help="move N whole training identities into a val split, deterministically (for "
                             "datasets without one: ICFG-PEDES; configs/irra_icfg_pedes.yaml uses 300); "
                             "default 0: the official splits")
    parser.add_argument("--test-ids", type=int, default=0, metavar="N",
                        help="--dataset jsonl: move N whole identities (of the lines without a split) into "
                             "the test split, deterministically")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad records instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="replace another dataset's shards in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--index-only", action="store_true",
                        help="write only the index files and manifest for the <split>-*.tar already in --out "
                             "(shards written by another tool in the documented layout)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``irra-build-shards``: parse argv, build the shards, print the dataset table and a summary.

    Returns:
        0 on success, 2 on bad input (one ``error:`` line on stderr).
    """
    parser = _arg_parser()
    args = parser.parse_args(argv)
    if args.index_only and not args.out:
        parser.error("--index-only needs --out DIR, the folder holding the tars")
    jsonl = (args.dataset or "").lower() == JSONL_NAME
    if jsonl and not (args.ann and args.images):
        parser.error("--dataset jsonl needs --ann FILE.jsonl and --images DIR")
    if not args.index_only and not jsonl and not (args.dataset and args.root):
        parser.error("the following arguments are required: --dataset, --root")
    if args.test_ids and not jsonl:
        parser.error("--test-ids is for --dataset jsonl (the official datasets have their test split)")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.index_only:
            out = Path(args.out)
            manifest = index_shards(out, dataset=args.dataset)
        else:
            out, manifest = _build_from_args(args)
    except (ShardError, DatasetError, DatasetNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _print_summary(out, manifest)
    return 0


def _build_from_args(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Parse the dataset, print its table, write the shards; returns (out folder, manifest)."""
    if args.dataset.lower() == JSONL_NAME:
        parsed = parse_jsonl(args.ann, args.images, skip_bad=args.skip_bad, val_ids=args.val_ids,
                             test_ids=args.test_ids)
    else:
        parsed = parse_dataset(args.dataset, args.root, skip_bad=args.skip_bad)
        parsed = carve_val_identities(parsed, args.val_ids)
    out = Path(args.out) if args.out else Path("shards") / parsed.name
    print(parsed.table())
    total = sum(len(parsed.splits[split]) for split in SPLITS)
    with tqdm(total=total, desc=f"shards {parsed.name}", unit="img", disable=args.no_progress) as bar:
        manifest = build_shards(parsed, None, out, shard_size=args.shard_size, workers=args.workers,
                                pre_resize=args.pre_resize, pre_resize_format=args.pre_resize_format,
                                overwrite=args.overwrite, skip_bad=args.skip_bad, progress=bar.update)
    return out, manifest


def _print_summary(out: Path, manifest: dict[str, Any]) -> None:
    for split, entry in manifest["splits"].items():
        size = sum(s["bytes"] for s in entry["shards"])
        print(f"{split}: {len(entry['shards'])} shards, {entry['num_images']} images, "
              f"{entry['num_captions']} captions, {size / 2**20:.1f} MiB")
    print(f"wrote {out / MANIFEST_NAME} ({manifest['num_train_ids']} train ids, "
          f"{manifest['num_skipped']} skipped)")
