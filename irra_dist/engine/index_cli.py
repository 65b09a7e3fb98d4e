"""``irra-index build``: embed a gallery with a trained model and write a faiss index folder.

Embedding runs on every process that ``accelerate launch`` starts (one per GPU; one process on a CPU): the
images still to embed are cut into chunks of ``--chunk-size``, process r embeds chunks r, r + N, ... and
writes each finished chunk to ``<out>/partial/<plan>/`` atomically. An interrupted build, run again with
the same arguments, embeds only the chunks that are missing. The first process then joins the chunks,
builds the faiss index and writes the folder (:mod:`irra_dist.retrieval.index`).

An existing index of the same model at ``--out`` is extended: images it already holds, unchanged (same
path, size and mtime; same shard set), keep their features; only new or changed images are embedded.
Unreadable image files are skipped and counted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from irra_dist.config import ConfigError
from irra_dist.data.shards import ShardError
from irra_dist.fileio import atomic_write
from irra_dist.model import CheckpointError
from irra_dist.retrieval.errors import SearchError
from irra_dist.retrieval.gallery import ItemImages, gallery_items
from irra_dist.retrieval.index import (
    META_FILE,
    GalleryIndexError,
    IndexSpec,
    Items,
    merge_items,
    normalize_rows,
    read_features,
    read_items,
    read_meta,
    write_index,
)
from irra_dist.retrieval.model import load_search_model, model_section

logger = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
PARTIAL_DIR = "partial"


# --------------------------------------------------------------------------------------------------
# Resumable, distributed embedding


def _chunk_path(work: Path, chunk: int) -> Path:
    return work / f"chunk_{chunk:06d}.npz"


def embed_items(accelerator, model: torch.nn.Module, items: Items, image_size: tuple[int, int], work: Path, *,
                chunk_size: int, batch_size: int, num_workers: int, precision: str = "fp32",
                ) -> tuple[np.ndarray, np.ndarray] | None:
    """Embed `items` on every process, chunk by chunk, skipping chunks already on disk in `work`.

    Args:
        accelerator: supplies the device, the process rank and count.
        model: the IRRA model (its ``encode_image``).
        items: the images to embed.
        image_size: the model's input (height, width).
        work: folder of the finished chunks (same folder for the same plan: that is what makes it resume).
        chunk_size: images per chunk file.
        batch_size: images per forward pass.
        num_workers: DataLoader workers decoding images.
        precision: ``eval.precision`` setting (fp32, fp16 or train).

    Returns:
        On the main process ``(features [n, D] float32, readable [n] bool)`` in item order; None elsewhere.
    """
    from irra_dist.engine.evaluate import embedding_autocast, show_progress

    num_chunks = -(-len(items) // chunk_size)
    mine = [c for c in range(accelerator.process_index, num_chunks, accelerator.num_processes)
            if not _chunk_path(work, c).is_file()]
    rows = [r for c in mine for r in range(c * chunk_size, min((c + 1) * chunk_size, len(items)))]
    device = accelerator.device
    model = model.to(device).eval()
    autocast = embedding_autocast(accelerator, precision)
    if rows:
        loader = DataLoader(ItemImages(items.take(rows), image_size), batch_size=batch_size,
                            num_workers=num_workers, pin_memory=device.type == "cuda")
        bar = tqdm(total=len(rows), unit="img", desc="embedding", disable=not show_progress(accelerator))
        feats: list[np.ndarray] = []
        good: list[np.ndarray] = []
        buffered = 0
        pending = list(mine)
        with torch.no_grad():
            for images, ok in loader:
                with autocast():
                    out = model.encode_image(images.to(device, non_blocking=True)).float()
                feats.append(out.cpu().numpy())
                good.append(ok.numpy())
                buffered += len(ok)
                bar.update(len(ok))
                # Write every chunk that is complete, so that an interruption loses at most one chunk.
                while pending and buffered >= _chunk_len(pending[0], chunk_size, len(items)):
                    n = _chunk_len(pending[0], chunk_size, len(items))
                    all_feats, all_good = np.concatenate(feats), np.concatenate(good)
                    _save_chunk(_chunk_path(work, pending.pop(0)), all_feats[:n], all_good[:n])
                    feats, good, buffered = [all_feats[n:]], [all_good[n:]], buffered - n
        bar.close()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    parts = [np.load(_chunk_path(work, c)) for c in range(num_chunks)]
    return (np.concatenate([p["feats"] for p in parts]).astype(np.float32),
            np.concatenate([p["ok"] for p in parts]).astype(bool))


def _chunk_len(chunk: int, chunk_size: int, total: int) -> int:
    return min(chunk_size, total - chunk * chunk_size)


def _save_chunk(path: Path, feats: np.ndarray, ok: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, feats=feats, ok=ok)

    atomic_write(path, write)


# --------------------------------------------------------------------------------------------------
# Building


def build_index(model_path: str | os.PathLike, gallery: str | os.PathLike, out: str | os.PathLike, *,
                spec: IndexSpec, split: str | None = None, weights: str = "best", rebuild: bool = False,
                chunk_size: int = 4096, batch_size: int = 64, num_workers: int = 0,
                precision: str = "fp32") -> dict | None:
    """Embed `gallery` with the model at `model_path` and write (or extend) the index at `out`.

    Call it on every process of a launch; the main process writes the index.

    Returns:
        On the main process: ``{"num_items", "embedded", "reused", "skipped", "first_skipped", "meta"}``;
        None on the other processes.

    Raises:
        GalleryIndexError, SearchError, ShardError, CheckpointError, ConfigError: bad input (one line).
    """
    from irra_dist.config import Config
    from irra_dist.engine.accel import build_accelerator

    model_path, out = Path(model_path), Path(out)
    is_run = model_path.is_dir()
    loaded = load_search_model(run=model_path if is_run else None, checkpoint=None if is_run else model_path,
                               weights=weights)
    model_meta = model_section(loaded, model_path, weights)
    listing = gallery_items(gallery, split or loaded.default_split)

    old, old_feats = Items.empty(), None
    if (out / META_FILE).is_file() and not rebuild:
        meta = read_meta(out)
        if meta.model.get("fingerprint") != model_meta["fingerprint"]:
            raise GalleryIndexError(f"{out} holds an index built by another model "
                                    f"({meta.model.get('source')}): pass --rebuild to replace it, or another "
                                    "--out")
        old, old_feats = read_items(out), read_features(out, meta.num_items, meta.dim)
    elif (out.is_dir() and not (out / META_FILE).is_file()
          and any(p.name != PARTIAL_DIR for p in out.iterdir())):
        raise GalleryIndexError(f"{out} exists and is not an index: pass an empty or new folder as --out")
    items, reuse = merge_items(old, listing)
    todo = [i for i, r in enumerate(reuse) if r is None]

    # As irra-eval: gloo without CUDA, so that N launched processes share the work instead of each doing all.
    # Compile and accumulation settings do not apply to embedding; the default config leaves them off.
    accelerator = build_accelerator(Config())
    plan = hashlib.sha256(json.dumps([model_meta["fingerprint"], chunk_size,
                                      [items.key[i] for i in todo]]).encode()).hexdigest()[:16]
    work = out / PARTIAL_DIR / plan
    if accelerator.is_main_process:
        work.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    embedded = embed_items(accelerator, loaded.model, items.take(todo), loaded.image_size, work,
                           chunk_size=chunk_size, batch_size=batch_size, num_workers=num_workers,
                           precision=precision) if todo else (np.zeros((0, 0), np.float32), np.zeros(0, bool))
    if not accelerator.is_main_process:
        return None
    new_feats, ok = embedded
    new_feats = normalize_rows(new_feats) if todo else new_feats
    dim = int(loaded.model.embed_dim)
    feats = np.empty((len(items), dim), dtype=np.float32)
    keep = np.ones(len(items), dtype=bool)
    reused_rows = [(i, r) for i, r in enumerate(reuse) if r is not None]
    if reused_rows:
        feats[[i for i, _ in reused_rows]] = old_feats[[r for _, r in reused_rows]]
    if todo:
        feats[todo] = new_feats
        keep[todo] = ok
    skipped = [items.name[i] for i in np.flatnonzero(~keep)]
    if not keep.any():
        raise GalleryIndexError(f"none of the {len(items)} images of {gallery} can be read (e.g. "
                                f"{skipped[0]}): pass a folder of image files")
    kept = np.flatnonzero(keep).tolist()
    meta = write_index(out, feats[kept], items.take(kept), spec, model_meta, normalized=True)
    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
    return {"num_items": meta.num_items, "embedded": len(todo) - len(skipped), "reused": len(reused_rows),
            "skipped": len(skipped), "first_skipped": skipped[0] if skipped else None, "meta": meta}


# --------------------------------------------------------------------------------------------------
# Command line


def _arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irra-index",
        description="Build or extend a faiss index of a gallery for irra-search --index and irra-serve. "
                    "Run it under `accelerate launch` to embed on every GPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="embed a gallery and write (or extend) an index folder")
    build.add_argument("model", metavar="RUN|CHECKPOINT",
                       help="a run folder (config.yaml + weights) or a weights file (.safetensors, "
                            "best.pth)")
    build.add_argument("--gallery", required=True,
                       help="a folder of images (recursive) or a shard set folder")
    build.add_argument("--out", required=True, metavar="INDEX_DIR", help="the index folder")
    build.add_argument("--split", default=None, help="shard split (default: the run's eval.split, else test)")
    build.add_argument("--weights", default="best", choices=("best", "last"), help="with a run folder")
    build.add_argument("--ivf", type=int, default=0, metavar="NLIST",
                       help="an IVF-PQ index with NLIST cells (with --pq); default: exact inner product")
    build.add_argument("--pq", type=int, default=0, metavar="M", help="IVF-PQ: bytes per image (sub-vectors)")
    build.add_argument("--nprobe", type=int, default=0,
                       help="IVF-PQ: cells visited per query (default min(NLIST, 16))")
    build.add_argument("--hnsw", type=int, default=0, metavar="M",
                       help="an HNSW graph index with M neighbours")
    build.add_argument("--ef-search", type=int, default=64, help="HNSW: candidates per query (default 64)")
    build.add_argument("--rebuild", action="store_true",
                       help="replace the index at --out instead of adding to it")
    build.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    build.add_argument("--chunk-size", type=int, default=4096,
                       help="images per saved chunk: an interrupted build resumes from the last chunk")
    build.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                       help="workers decoding images, per process")
    build.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "train"),
                       help="embedding precision (fp16 autocast on GPUs only; default fp32)")
    return parser


def _spec(args: argparse.Namespace) -> IndexSpec:
    if args.hnsw and (args.ivf or args.pq):
        raise GalleryIndexError("pass either --ivf NLIST --pq M or --hnsw M, not both")
    if bool(args.ivf) != bool(args.pq):
        raise GalleryIndexError("an IVF-PQ index needs both --ivf NLIST and --pq M (e.g. --ivf 1024 --pq 64)")
    if args.ivf:
        return IndexSpec("ivfpq", nlist=args.ivf, pq_m=args.pq, nprobe=args.nprobe or min(args.ivf, 16))
    if args.hnsw:
        return IndexSpec("hnsw", hnsw_m=args.hnsw, ef_search=args.ef_search)
    return IndexSpec("flat")


def main(argv: Sequence[str] | None = None) -> int:
    """``irra-index``. Returns 0, or 2 on bad input (one ``irra-index: error:`` line)."""
    args = _arg_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    first = int(os.environ.get("RANK", "0")) == 0
    try:
        if min(args.batch_size, args.chunk_size) < 1 or args.num_workers < 0 or min(args.ivf, args.pq,
                                                                                     args.hnsw) < 0:
            raise GalleryIndexError("--batch-size and --chunk-size must be >= 1, --num-workers, --ivf, --pq "
                                    "and --hnsw >= 0")
        result = build_index(args.model, args.gallery, args.out, spec=_spec(args), split=args.split,
                             weights=args.weights, rebuild=args.rebuild, chunk_size=args.chunk_size,
                             batch_size=args.batch_size, num_workers=args.num_workers,
                             precision=args.precision)
    except (GalleryIndexError, SearchError, ShardError, CheckpointError, ConfigError, OSError) as err:
        if first:
            print(f"irra-index: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if result is None:
        return 0
    if result["skipped"]:
        print(f"skipped {result['skipped']} unreadable image(s), e.g. {result['first_skipped']}")
    meta = result["meta"]
    print(f"index {args.out}: {meta.num_items} images ({result['embedded']} embedded, {result['reused']} "
          f"reused), {meta.spec.describe()}, model {meta.model['fingerprint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
