"""Free-text person search with a trained IRRA model: loading the model, and the ``irra-search`` command.

A query text goes through the text tower; the gallery images through the image tower, once: their features
are cached on disk (:mod:`irra_dist.retrieval.cache`), so the next query against the same gallery only
encodes the text. The gallery is one split of a shard set, pids known, or a plain folder of images
(:mod:`irra_dist.retrieval.gallery`); the ranking is the cosine of the global features, as in evaluation
(:mod:`irra_dist.retrieval.ranking`, IRRA_SPEC 5).

All queries of one call go into ONE PNG, a row per query (:func:`irra_dist.visualize.render_retrieval_grid`),
by default ``<run or checkpoint folder>/search_<slug of the first query>[_and_<n>_more].png``; the top-k are
also printed as a table (score, and pid plus correct/wrong when known).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from irra_dist.config import ConfigError
from irra_dist.data.shards import MANIFEST_NAME, ShardError
from irra_dist.engine.cli import image_size_arg
from irra_dist.fileio import atomic_write_bytes, file_sha256
from irra_dist.model import IRRA, CheckpointError
from irra_dist.model.weights import CONFIG_FILE, WEIGHTS_CHOICES, WEIGHTS_FILE, load_model
from irra_dist.retrieval.cache import cached_gallery_features
from irra_dist.retrieval.gallery import (  # noqa: F401 (FolderGallery: irra_dist.serving imports it from here)
    FolderGallery,
    ShardGallery,
    open_gallery,
    split_caption_queries,
)
from irra_dist.retrieval.ranking import search
from irra_dist.retrieval.results import (  # noqa: F401 (format_results, slugify: part of this module's API)
    default_out_path,
    format_results,
    render_results,
    slugify,
)
from irra_dist.tokenizer import TokenizerError
from irra_dist.visualize import VisualizeError

logger = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2


class SearchError(ValueError):
    """Input that search cannot use; the message is one line naming the problem and the fix."""


# --------------------------------------------------------------------------------------------------
# The model


@dataclass
class SearchModel:
    """A model ready for search and what was learned while loading it."""

    model: IRRA
    weights_path: Path
    """The file whose SHA-256 identifies the weights (gallery cache and index keys)."""
    image_size: tuple[int, int]
    home: Path
    """The run folder, or the checkpoint's folder: default place for the PNG and the feature cache."""
    default_gallery: Path | None
    """The run's shard folder (``data.shards``) when it exists."""
    default_split: str


def load_search_model(run: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
                      *, weights: str = "best", image_size: tuple[int, int] | None = None,
                      stride_size: int | None = None) -> SearchModel:
    """Load IRRA from a run folder or from one weights file (:func:`irra_dist.model.weights.load_model`).

    Args:
        run: a run folder written by the trainer (config.yaml plus best.safetensors / model.safetensors, or
            its checkpoints), or a checkpoint folder.
        checkpoint: a weights file: a safetensors export (ours), an official IRRA ``best.pth``, an OpenAI
            CLIP file.
        weights: for a run folder, "best" (best.safetensors when it exists, else model.safetensors) or
            "last" (model.safetensors), as ``irra-eval --weights``.
        image_size: (height, width) override; by default the size the weights record (official files: the
            official 384x128).
        stride_size: patch stride override, found the same way (default 16).

    Returns:
        The fp32 model on the CPU, in eval mode.

    Raises:
        SearchError: neither or both sources, a missing folder or file.
        CheckpointError, ConfigError: unreadable weights or config.
    """
    if (run is None) == (checkpoint is None):
        raise SearchError("pass exactly one of --run RUN_DIR or --checkpoint FILE")
    if weights not in WEIGHTS_CHOICES:
        raise SearchError(f"weights must be 'best' or 'last', got {weights!r}")
    target = Path(run if run is not None else checkpoint)
    if run is not None and not target.is_dir():
        raise SearchError(f"run folder not found: {target} (pass --run with a folder holding {CONFIG_FILE} "
                          f"and {WEIGHTS_FILE})")
    if checkpoint is not None and not target.exists():
        raise SearchError(f"checkpoint not found: {target} (pass a .safetensors export or an official IRRA "
                          "best.pth)")
    loaded = load_model(target, weights=weights, image_size=image_size, stride_size=stride_size)
    run_dir = loaded.source.run_dir
    home = run_dir or (target if target.is_dir() else target.parent)
    default_gallery = None
    if run_dir is not None:
        from irra_dist.engine.runfolder import load_run_config

        shards = Path(load_run_config(run_dir).eval_shards())
        default_gallery = shards if (shards / MANIFEST_NAME).is_file() else None
    model = loaded.model.eval()
    size = model.base_model.visual.image_size
    # The test split is the evaluation gallery; val (where runs now select) is often a small carve-out.
    return SearchModel(model, loaded.source.digest_file, (int(size[0]), int(size[1])), home, default_gallery,
                       "test")


def file_digest(path: Path, memo_dir: Path | None = None) -> str:
    """SHA-256 of a file; with `memo_dir`, remembered there per (path, size, mtime) so big files hash once.

    Args:
        path: the file.
        memo_dir: folder for the remembered digests; None hashes every time.

    Returns:
        The hex digest.
    """
    st = path.stat()
    memo = None
    if memo_dir is not None:
        stat_key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        memo = memo_dir / f"weights_{hashlib.sha256(stat_key.encode()).hexdigest()[:20]}.sha256"
        if memo.is_file():
            text = memo.read_text().strip()
            if re.fullmatch(r"[0-9a-f]{64}", text):
                return text
    hexdigest = file_sha256(path)
    if memo is not None:
        atomic_write_bytes(memo, hexdigest.encode() + b"\n")
    return hexdigest


# --------------------------------------------------------------------------------------------------
# Command line


def _arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irra-search",
        description="Search a gallery of person images with free text; prints the top-k and writes a PNG "
                    "grid (one row per query, all queries in one file).",
        epilog="To answer from a faiss index built by irra-index instead: irra-search --index INDEX_DIR "
               "--query TEXT [--runtime torch|onnx] (see irra-search --index X --help).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run folder holding config.yaml and model.safetensors")
    source.add_argument("--checkpoint", help="a .safetensors export or an official IRRA best.pth")
    parser.add_argument("--weights", default="best", choices=("best", "last"),
                        help="with --run: best.safetensors (if any) or model.safetensors (default best)")
    parser.add_argument("--query", action="append", default=[], help="a query text (repeatable)")
    parser.add_argument("--query-pid", action="append", type=int, default=[],
                        help="person id of each --query, in order, to mark hits correct/wrong")
    parser.add_argument("--queries-file", help="a text file with one query per line")
    parser.add_argument("--from-split-captions", type=int, default=0, metavar="N",
                        help="also query with the first caption of the first N distinct pids of the split")
    parser.add_argument("--gallery", help="shard set folder (manifest.json) or a folder of images "
                                          "(default with --run: the run's data.shards)")
    parser.add_argument("--split", default=None, help="shard split to search (default: test, the "
                                                      "evaluation gallery)")
    parser.add_argument("--top-k", type=int, default=10, help="hits per query (default 10)")
    parser.add_argument("--out", help="PNG path (default: <run or checkpoint folder>/search_<slug>.png)")
    parser.add_argument("--cache-dir",
                        help="gallery feature cache (default: <run or checkpoint folder>/cache)")
    parser.add_argument("--image-size", type=image_size_arg, default=None, metavar="HxW",
                        help="input size override (default: from the run config or the weights file)")
    parser.add_argument("--stride-size", type=int, default=None, help="patch stride override")
    parser.add_argument("--thumb-size", type=image_size_arg, default=(128, 48), metavar="HxW",
                        help="thumbnail size in the PNG (default 128x48)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="workers decoding gallery images")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    return parser


def _read_queries(args: argparse.Namespace) -> tuple[list[str], list[int | None]]:
    if args.query_pid and len(args.query_pid) != len(args.query):
        raise SearchError(f"got {len(args.query_pid)} --query-pid for {len(args.query)} --query: give one "
                          "pid per --query, in the same order, or none")
    texts = list(args.query)
    pids: list[int | None] = list(args.query_pid) if args.query_pid else [None] * len(texts)
    if args.queries_file:
        path = Path(args.queries_file)
        if not path.is_file():
            raise SearchError(f"queries file not found: {path} (pass a text file with one query per line)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise SearchError(f"{path} is not UTF-8 text (byte {err.start} is "
                              f"0x{err.object[err.start]:02x}): "
                              "save it as UTF-8, one query per line") from None
        lines = [line.strip() for line in text.splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise SearchError(f"{path} holds no query: write one query per line")
        texts += lines
        pids += [None] * len(lines)
    if any(not t.strip() for t in texts):
        raise SearchError("a --query is empty: pass a description such as --query 'a man in a red jacket'")
    return texts, pids


def main(argv: Sequence[str] | None = None) -> int:
    """``irra-search``: parse argv, search, print the top-k per query and write the PNG grid.

    Returns:
        0 on success, 2 on bad input (one ``error:`` line on stderr).
    """
    from irra_dist.serving.query_cli import index_main, wants_index

    if wants_index(sys.argv[1:] if argv is None else argv):
        return index_main(sys.argv[1:] if argv is None else list(argv))
    args = _arg_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.top_k < 1 or args.batch_size < 1 or args.num_workers < 0 or args.from_split_captions < 0:
            raise SearchError("--top-k and --batch-size must be >= 1, --num-workers and "
                              "--from-split-captions >= 0")
        texts, pids = _read_queries(args)
        if not texts and not args.from_split_captions:
            raise SearchError("no query: pass --query TEXT (repeatable), --queries-file FILE or "
                              "--from-split-captions N")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
            else torch.device(args.device)
        loaded = load_search_model(args.run, args.checkpoint, weights=args.weights,
                                   image_size=args.image_size, stride_size=args.stride_size)
        split = args.split or loaded.default_split
        if args.gallery is None and loaded.default_gallery is None:
            raise SearchError("no gallery: pass --gallery with a shard set folder or a folder of images")
        gallery = open_gallery(args.gallery or loaded.default_gallery, split)
        if args.from_split_captions:
            if not isinstance(gallery, ShardGallery):
                raise SearchError("--from-split-captions needs a shard set gallery (a folder with "
                                  f"{MANIFEST_NAME}), not a folder of images")
            fixed = split_caption_queries(gallery.shards_dir, split, args.from_split_captions)
            texts += fixed.texts
            pids += fixed.pids.tolist()
        cache_dir = Path(args.cache_dir) if args.cache_dir else loaded.home / "cache"
        feats, cache_path, hit = cached_gallery_features(loaded, gallery, cache_dir=cache_dir,
                                                         batch_size=args.batch_size,
                                                         num_workers=args.num_workers, device=device)
        results = search(loaded, gallery, feats, texts, pids, top_k=args.top_k, device=device)
        out = Path(args.out) if args.out else default_out_path(loaded.home, texts)
        render_results(results, gallery, out, thumb_size=args.thumb_size)
    except (SearchError, ShardError, CheckpointError, ConfigError, VisualizeError, TokenizerError,
            OSError) as err:
        print(f"irra-search: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_results(results))
    print(f"gallery: {len(gallery)} images, features {'read from' if hit else 'cached in'} {cache_path}")
    print(f"wrote {out}")
    return 0
