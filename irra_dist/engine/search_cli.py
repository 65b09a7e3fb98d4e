"""``irra-search``: free-text person search, over a gallery or over a faiss index.

- Over a gallery (``--run RUN | --checkpoint FILE``, ``--gallery``): the gallery images go through the image
  tower once and their features are cached (:mod:`irra_dist.retrieval.cache`); each query is ranked by the
  cosine of the global features, as in evaluation (:mod:`irra_dist.retrieval.ranking`).
- Over an index (``--index INDEX_DIR``, built by ``irra-index``): the text tower runs in PyTorch or, with
  ``--runtime onnx``, in onnxruntime (:mod:`irra_dist.retrieval.query`), in which case neither torch nor the
  training stack is imported: the gallery path imports them inside :func:`gallery_main`.

Both print the top-k as a table (score, and pid plus correct/wrong when known) and write all queries of one
call into ONE PNG, a row per query, by default ``<run, checkpoint or index folder>/search_<slug of the first
query>[_and_<n>_more].png`` (:mod:`irra_dist.retrieval.results`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from irra_dist.engine.cli import image_size_arg
from irra_dist.retrieval.errors import SearchError
from irra_dist.retrieval.index import GalleryIndex, GalleryIndexError
from irra_dist.retrieval.onnx_runtime import OnnxRuntimeError
from irra_dist.retrieval.query import open_text_encoder, query_index
from irra_dist.retrieval.results import default_out_path, format_results, render_results
from irra_dist.tokenizer import TokenizerError
from irra_dist.visualize import VisualizeError

EXIT_BAD_INPUT = 2

# --------------------------------------------------------------------------------------------------
# Over a gallery


def gallery_arg_parser() -> argparse.ArgumentParser:
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


def gallery_main(argv: Sequence[str]) -> int:
    """``irra-search`` over a gallery: search, print the top-k per query and write the PNG grid.

    Returns:
        0 on success, 2 on bad input (one ``irra-search: error:`` line on stderr).
    """
    import torch

    from irra_dist.config import ConfigError
    from irra_dist.data.shards import MANIFEST_NAME, ShardError
    from irra_dist.model import CheckpointError
    from irra_dist.retrieval.cache import cached_gallery_features
    from irra_dist.retrieval.gallery import ShardGallery, open_gallery, split_caption_queries
    from irra_dist.retrieval.model import load_search_model
    from irra_dist.retrieval.ranking import search

    args = gallery_arg_parser().parse_args(argv)
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

# --------------------------------------------------------------------------------------------------
# Over an index


def add_text_tower_args(parser: argparse.ArgumentParser) -> None:
    """The options choosing the text tower that queries an index (``irra-search --index``, ``irra-serve``),
    read by :func:`irra_dist.retrieval.query.open_text_encoder`."""
    parser.add_argument("--runtime", default="torch", choices=("torch", "onnx"),
                        help="text tower in PyTorch, or in onnxruntime from an irra-export folder (no torch)")
    parser.add_argument("--onnx", metavar="DIR", help="irra-export folder (default: <run folder>/onnx)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", help="torch runtime: run folder (default: the model that built the index)")
    source.add_argument("--checkpoint", help="torch runtime: a weights file instead")
    parser.add_argument("--weights", default=None, choices=("best", "last"), help="with --run")
    parser.add_argument("--device", default="auto", help="torch runtime: auto, cpu, cuda, cuda:1 ...")


def index_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irra-search --index",
        description="Answer text queries from a faiss index built by irra-index; prints the top-k and writes "
                    "a PNG grid (one row per query). Without --index, irra-search searches a gallery.")
    parser.add_argument("--index", required=True, metavar="INDEX_DIR",
                        help="folder written by irra-index build")
    parser.add_argument("--query", action="append", default=[], help="a query text (repeatable)")
    parser.add_argument("--query-pid", action="append", type=int, default=[],
                        help="person id of each --query, in order, to mark hits correct/wrong")
    parser.add_argument("--top-k", type=int, default=10, help="hits per query (default 10)")
    parser.add_argument("--out", help="PNG path (default: <index>/search_<slug>.png)")
    parser.add_argument("--thumb-size", type=image_size_arg, default=(128, 48), metavar="HxW",
                        help="thumbnail size in the PNG (default 128x48)")
    add_text_tower_args(parser)
    parser.add_argument("--nprobe", type=int, default=None, help="IVF-PQ: cells visited per query")
    parser.add_argument("--ef-search", type=int, default=None, help="HNSW: candidates per query")
    parser.add_argument("--no-png", action="store_true", help="print the table only")
    return parser


def index_main(argv: Sequence[str]) -> int:
    """``irra-search --index``. Returns 0, or 2 on bad input (one ``irra-search: error:`` line)."""
    args = index_arg_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    errors: tuple[type[BaseException], ...] = (GalleryIndexError, OnnxRuntimeError, SearchError,
                                               TokenizerError, VisualizeError, OSError)
    if args.runtime == "torch":  # these modules import torch: not for --runtime onnx
        from irra_dist.config import ConfigError
        from irra_dist.model import CheckpointError

        errors += (ConfigError, CheckpointError)
    try:
        if args.query_pid and len(args.query_pid) != len(args.query):
            raise GalleryIndexError(f"got {len(args.query_pid)} --query-pid for {len(args.query)} --query: "
                                    "give one pid per --query, in the same order, or none")
        if not args.query:
            raise GalleryIndexError("no query: pass --query TEXT (repeatable)")
        if any(not q.strip() for q in args.query):
            raise GalleryIndexError("a --query is empty: pass a description such as "
                                    "--query 'a man in a red jacket'")
        if args.top_k < 1:
            raise GalleryIndexError(f"--top-k must be >= 1, got {args.top_k}")
        index = GalleryIndex(args.index)
        encoder = open_text_encoder(index, runtime=args.runtime, onnx_dir=args.onnx,
                                    model=args.run or args.checkpoint, weights=args.weights,
                                    device=args.device)
        results = query_index(index, encoder, args.query, args.query_pid or None, top_k=args.top_k,
                              nprobe=args.nprobe, ef_search=args.ef_search)
        out = None
        if not args.no_png:
            out = Path(args.out) if args.out else default_out_path(index.root, args.query)
            render_results(results, index, out, thumb_size=args.thumb_size)
    except errors as err:
        print(f"irra-search: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_results(results))
    print(f"index: {len(index)} images, {index.meta.spec.describe()}, model {index.fingerprint} "
          f"({args.runtime} text tower)")
    if out is not None:
        print(f"wrote {out}")
    return 0


def wants_index(argv: Sequence[str]) -> bool:
    """Whether a command line asks for an index search (``--index DIR`` or ``--index=DIR``)."""
    return any(a == "--index" or a.startswith("--index=") for a in argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``irra-search`` console script: index search with ``--index``, else the gallery search."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return index_main(argv) if wants_index(argv) else gallery_main(argv)


if __name__ == "__main__":
    sys.exit(main())
