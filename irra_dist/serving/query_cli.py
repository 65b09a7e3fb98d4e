"""``irra-search --index INDEX_DIR --query TEXT``: answer text queries from a faiss index.

Same output as ``irra-search`` over a gallery (the top-k table and one PNG grid, :mod:`irra_dist.retrieval
.results`). The text tower runs in PyTorch (``--runtime torch``, the model the index records, or ``--run`` /
``--checkpoint``) or in onnxruntime (``--runtime onnx``, an ``irra-export`` folder), in which case neither
torch nor the training stack is imported. A model whose fingerprint differs from the index's is refused.

This module is also the ``irra-search`` console script: without ``--index`` it hands the command line to
:func:`irra_dist.search.main` (the gallery search), imported only then.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from irra_dist.engine.cli import image_size_arg
from irra_dist.retrieval.index import GalleryIndex, GalleryIndexError
from irra_dist.retrieval.onnx_runtime import OnnxRuntimeError, OnnxTextEncoder
from irra_dist.retrieval.results import QueryResult, default_out_path, format_results, render_results
from irra_dist.tokenizer import TokenizerError
from irra_dist.visualize import VisualizeError

EXIT_BAD_INPUT = 2
DEFAULT_ONNX_DIR = "onnx"
"""``--runtime onnx`` without ``--onnx``: this folder inside the run folder (or the weights file's folder)."""


class TextEncoder(Protocol):
    """Texts -> global text features; ``fingerprint`` identifies the model (see the index)."""

    fingerprint: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class TorchTextEncoder:
    """The PyTorch text tower of a run folder or weights file (imports torch and the model)."""

    def __init__(self, source: str | os.PathLike, weights: str = "best", device: str = "auto") -> None:
        import torch

        from irra_dist.search import load_search_model
        from irra_dist.serving.index_cli import model_section

        source = Path(source)
        self.loaded = load_search_model(run=source if source.is_dir() else None,
                                        checkpoint=None if source.is_dir() else source, weights=weights)
        self.fingerprint = model_section(self.loaded, source, weights)["fingerprint"]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" \
            else torch.device(device)
        self.model = self.loaded.model.to(self.device).eval()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        from irra_dist.tokenizer import tokenize

        ids = tokenize(list(texts), context_length=self.model.base_model.context_length)
        with torch.no_grad():
            return torch.cat([self.model.encode_text(chunk.to(self.device)) for chunk in ids.split(256)]
                             ).float().cpu().numpy()


def open_text_encoder(index: GalleryIndex, *, runtime: str = "torch", onnx_dir: str | None = None,
                      model: str | None = None, weights: str | None = None,
                      device: str = "auto") -> TextEncoder:
    """The text tower to query `index` with, refused when it is not the model that built the index.

    Args:
        index: the loaded index.
        runtime: "torch" or "onnx".
        onnx_dir: ``irra-export`` folder (onnx; default ``<the index's run folder>/onnx``).
        model: run folder or weights file (torch; default the one that built the index).
        weights: "best" or "last" with a run folder (default: as the index was built).
        device: torch device ("auto": cuda when available).

    Raises:
        GalleryIndexError: another model's index, or a missing model.
        OnnxRuntimeError: an unusable export folder.
    """
    recorded = index.meta.model
    if runtime == "onnx":
        if onnx_dir is None:
            home = Path(recorded["source"])
            onnx_dir = str((home if recorded.get("source_kind") == "run" else home.parent) / DEFAULT_ONNX_DIR)
        encoder: TextEncoder = OnnxTextEncoder(onnx_dir)
        what = f"the ONNX export {onnx_dir}"
    elif runtime == "torch":
        source = model or recorded.get("source")
        if not source or not Path(source).exists():
            raise GalleryIndexError(f"the model that built {index.root} is not at {source} any more: pass "
                                    "--run RUN_DIR or --checkpoint FILE")
        encoder = TorchTextEncoder(source, weights or recorded.get("weights", "best"), device)
        what = str(source)
    else:
        raise GalleryIndexError(f"unknown --runtime {runtime!r}: use torch or onnx")
    if encoder.fingerprint != index.fingerprint:
        raise GalleryIndexError(f"index {index.root} was built by another model (fingerprint "
                                f"{index.fingerprint}, {what} has {encoder.fingerprint}): query it with the "
                                "model that built it "
                                f"({recorded.get('source')}) or rebuild the index with irra-index build")
    return encoder


def query_index(index: GalleryIndex, encoder: TextEncoder, texts: Sequence[str],
                query_pids: Sequence[int | None] | None = None, *, top_k: int = 10, nprobe: int | None = None,
                ef_search: int | None = None) -> list[QueryResult]:
    """Encode the texts and return each one's top-k from the index (see :class:`QueryResult`)."""
    if not texts or any(not t.strip() for t in texts):
        raise GalleryIndexError("a query is empty: pass a description such as --query 'a man in a red "
                                "jacket'")
    query_pids = list(query_pids) if query_pids is not None else [None] * len(texts)
    scores, indices = index.search(encoder.encode(texts), top_k, nprobe=nprobe, ef_search=ef_search)
    results = []
    for q, text in enumerate(texts):
        found = indices[q] >= 0  # an approximate index may find fewer than k
        idx = indices[q][found].tolist()
        hit_pids = index.pids[idx].tolist() if index.pids is not None else None
        qpid = query_pids[q]
        correct = [p == qpid for p in hit_pids] if hit_pids is not None and qpid is not None else None
        results.append(QueryResult(text, qpid, scores[q][found].tolist(), idx, index.names(idx), hit_pids,
                                   correct))
    return results


# --------------------------------------------------------------------------------------------------
# Command line


def _arg_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--runtime", default="torch", choices=("torch", "onnx"),
                        help="text tower in PyTorch, or in onnxruntime from an irra-export folder (no torch)")
    parser.add_argument("--onnx", metavar="DIR", help="irra-export folder (default: <run folder>/onnx)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", help="torch runtime: run folder (default: the model that built the index)")
    source.add_argument("--checkpoint", help="torch runtime: a weights file instead")
    parser.add_argument("--weights", default=None, choices=("best", "last"), help="with --run")
    parser.add_argument("--device", default="auto", help="torch runtime: auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF-PQ: cells visited per query")
    parser.add_argument("--ef-search", type=int, default=None, help="HNSW: candidates per query")
    parser.add_argument("--no-png", action="store_true", help="print the table only")
    return parser


def index_main(argv: Sequence[str]) -> int:
    """``irra-search --index``. Returns 0, or 2 on bad input (one ``irra-search: error:`` line)."""
    args = _arg_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    errors: tuple[type[BaseException], ...] = (GalleryIndexError, OnnxRuntimeError, TokenizerError,
                                               VisualizeError, OSError)
    if args.runtime == "torch":
        from irra_dist.config import ConfigError
        from irra_dist.model import CheckpointError
        from irra_dist.search import SearchError

        errors += (ConfigError, CheckpointError, SearchError)
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
    if wants_index(argv):
        return index_main(argv)
    from irra_dist.search import main as gallery_main

    return gallery_main(argv)


if __name__ == "__main__":
    sys.exit(main())
