"""Free-text person search with a trained IRRA model, and the ``irra-search`` command.

A query text goes through the text tower; the gallery images through the image tower, once: their features
are cached on disk under ``<cache>/gallery_<key>.safetensors``, keyed by the SHA-256 of the weights file,
the gallery's content (the shard manifest plus split, or the names, sizes and mtimes of a folder's images)
and the input size, so the next query against the same gallery only encodes the text. Similarity is the
cosine of the global features, as in evaluation (IRRA_SPEC 5).

Two kinds of gallery:

- a shard set (a folder with ``manifest.json``, see :mod:`irra_dist.data.shards`): one split's images,
  person ids known, so each hit is marked correct or wrong against the query's pid;
- a plain folder of images (searched recursively, sorted by relative path): pids unknown.

All queries of one call go into ONE PNG, a row per query (:func:`irra_dist.visualize.render_retrieval_grid`),
by default ``<run or checkpoint folder>/search_<slug of the first query>[_and_<n>_more].png``; the top-k are
also printed as a table (score, and pid plus correct/wrong when known).

:class:`RetrievalExamples` is the trainer's hook: after each evaluation it draws a few fixed test queries
against the gallery features the evaluation just computed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from irra_dist.config import ConfigError
from irra_dist.data.pipeline import build_eval_loaders
from irra_dist.data.shards import (
    MANIFEST_NAME,
    RecordError,
    RecordReader,
    ShardError,
    SplitIndex,
    load_manifest,
)
from irra_dist.data.transforms import DECODE_ERRORS, decode_image, test_transform
from irra_dist.fileio import atomic_write, atomic_write_bytes
from irra_dist.model import IRRA, CheckpointError
from irra_dist.model.weights import CONFIG_FILE, WEIGHTS_CHOICES, WEIGHTS_FILE, load_model
from irra_dist.retrieval.results import (  # noqa: F401 (format_results, slugify: part of this module's API)
    QueryResult,
    default_out_path,
    format_results,
    render_results,
    slugify,
)
from irra_dist.tokenizer import TokenizerError, tokenize
from irra_dist.visualize import (
    FixedQueries,
    VisualizeError,
    save_retrieval_examples,
    top_k_matches,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
CACHE_VERSION = 1
"""Part of the cache key: bump it when the cached features would change for the same inputs."""
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
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    hexdigest = digest.hexdigest()
    if memo is not None:
        atomic_write_bytes(memo, hexdigest.encode() + b"\n")
    return hexdigest


# --------------------------------------------------------------------------------------------------
# Galleries


class Gallery(Protocol):
    """What search needs from a gallery."""

    content_key: str
    """Changes whenever the images (or their order) may have changed."""
    pids: torch.Tensor | None
    """LongTensor[G] of person ids, or None when unknown."""

    def __len__(self) -> int: ...

    def names(self, indices: Sequence[int]) -> list[str]:
        """A printable name of each image (relative path)."""
        ...

    def load_images(self, indices: Sequence[int]) -> list[Image.Image]:
        """The decoded RGB images, in the order asked."""
        ...

    def encode(self, model: IRRA, image_size: tuple[int, int], *, batch_size: int, num_workers: int,
               device: torch.device) -> torch.Tensor:
        """Image features [G, D] (fp32, not normalised) in gallery order; unreadable images are dropped from
        the gallery (see :meth:`drop`) and left out."""
        ...

    def drop(self, names: Sequence[str]) -> None:
        """Leave the images with these names out of the gallery (unreadable ones, as training does)."""
        ...


def _drop_positions(names: Sequence[str], unwanted: Sequence[str]) -> np.ndarray:
    """Positions to keep: those whose name is not in `unwanted`."""
    unwanted = set(unwanted)
    return np.array([i for i, name in enumerate(names) if name not in unwanted], dtype=np.int64)


def _warn_skipped(skipped: Sequence[str], where: str) -> None:
    if skipped:
        more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
        logger.warning("skipped %d unreadable image(s) in %s (%s%s): searching the other images",
                       len(skipped), where, skipped[0], more)


class ShardGallery:
    """One split of a shard set, read by gallery index (the record's position in its split).

    Args:
        shards_dir: folder with ``manifest.json``.
        split: "test" or "val" (any split in the manifest).
    """

    def __init__(self, shards_dir: str | os.PathLike, split: str = "test") -> None:
        self.shards_dir = Path(shards_dir)
        self.split = split
        manifest = load_manifest(self.shards_dir, verify="size")
        self.index = SplitIndex.load(self.shards_dir, manifest, split)
        self._reader = RecordReader(self.index)
        manifest_sha = hashlib.sha256((self.shards_dir / MANIFEST_NAME).read_bytes()).hexdigest()
        self.content_key = f"shards:{manifest_sha}:{split}"
        self.records = np.arange(len(self.index))
        """Gallery position -> record of the split (records that could not be read are dropped)."""
        self.pids = torch.from_numpy(self.index.pid.copy())
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.records)

    def _record_name(self, record: int) -> str:
        return f"{self.split}#{record}"

    def drop(self, names: Sequence[str]) -> None:
        keep = _drop_positions([self._record_name(int(r)) for r in self.records], names)
        self.records = self.records[keep]
        self.pids = torch.from_numpy(self.index.pid[self.records].copy())
        self.skipped = list(names)

    def _json(self, record: int) -> dict[str, Any]:
        try:
            return self._reader.read_json(record)
        except (RecordError, OSError, ValueError) as err:
            raise SearchError(f"{self.split} record {record} of {self.shards_dir} is unreadable ({err}): "
                              "rebuild the shards with irra-build-shards") from None

    def names(self, indices: Sequence[int]) -> list[str]:
        records = [int(self.records[int(i)]) for i in indices]
        return [str(self._json(r).get("rel_path", self._record_name(r))) for r in records]

    def load_images(self, indices: Sequence[int]) -> list[Image.Image]:
        images = []
        for i in indices:
            record = int(self.records[int(i)])
            try:
                images.append(decode_image(self._reader.read(record)[0]))
            except (*DECODE_ERRORS, RecordError) as err:
                raise SearchError(f"{self.split} gallery image {record} of {self.shards_dir} is unreadable "
                                  f"({err}): rebuild the shards with irra-build-shards") from None
        return images

    @torch.no_grad()
    def encode(self, model: IRRA, image_size: tuple[int, int], *, batch_size: int, num_workers: int,
               device: torch.device) -> torch.Tensor:
        gallery, _ = build_eval_loaders(self.shards_dir, self.split, batch_size=batch_size,
                                        num_workers=num_workers, image_size=image_size, verify="none",
                                        pin_memory=device.type == "cuda")
        feats = torch.empty(len(self.index), model.embed_dim, device=device)
        seen = torch.zeros(len(self.index), dtype=torch.bool, device=device)
        for batch in gallery:
            images = batch["images"].to(device, non_blocking=True)
            index = batch["index"].to(device)
            feats[index] = model.encode_image(images)
            seen[index] = True
        missing = [self._record_name(r) for r in (~seen).nonzero().flatten().tolist()]
        if missing:
            self.drop(missing)
            _warn_skipped(missing, f"the {self.split} split of {self.shards_dir}")
        return feats[torch.from_numpy(self.records).to(device)]


class _FolderDataset(Dataset):
    def __init__(self, paths: list[Path], image_size: tuple[int, int]) -> None:
        self.paths, self.image_size = paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        # A bad file is flagged rather than raised: exceptions from DataLoader workers come back as
        # multi-line tracebacks, and the caller wants one line naming the file.
        try:
            image = decode_image(self.paths[i].read_bytes())
        except DECODE_ERRORS:
            return torch.zeros(3, *self.image_size), False
        return test_transform(image, self.image_size), True


class FolderGallery:
    """The images under a folder (recursively, hidden files skipped), sorted by relative path.

    Args:
        root: the folder.

    Raises:
        SearchError: no such folder, or no image files in it.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SearchError(f"gallery folder not found: {self.root} (pass --gallery with a shard set or a "
                              "folder of images)")
        rels = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                      if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(self.root).parts))
        if not rels:
            raise SearchError(f"no images in {self.root} (looked for {', '.join(IMAGE_SUFFIXES)}): pass a "
                              "folder holding images, or a shard set folder with manifest.json")
        self.rel_paths = rels
        self.paths = [self.root / r for r in rels]
        listing = hashlib.sha256()
        for rel, path in zip(rels, self.paths):
            st = path.stat()
            listing.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        self.content_key = f"folder:{listing.hexdigest()}"
        self.pids = None
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.paths)

    def drop(self, names: Sequence[str]) -> None:
        keep = _drop_positions(self.rel_paths, names).tolist()
        self.rel_paths = [self.rel_paths[i] for i in keep]
        self.paths = [self.paths[i] for i in keep]
        self.skipped = list(names)

    def names(self, indices: Sequence[int]) -> list[str]:
        return [self.rel_paths[int(i)] for i in indices]

    def load_images(self, indices: Sequence[int]) -> list[Image.Image]:
        images = []
        for i in indices:
            path = self.paths[int(i)]
            try:
                images.append(decode_image(path.read_bytes()))
            except DECODE_ERRORS as err:
                raise SearchError(f"cannot read image {path} ({err}): remove or replace it") from None
        return images

    @torch.no_grad()
    def encode(self, model: IRRA, image_size: tuple[int, int], *, batch_size: int, num_workers: int,
               device: torch.device) -> torch.Tensor:
        loader = DataLoader(_FolderDataset(self.paths, image_size), batch_size=batch_size,
                            num_workers=num_workers, pin_memory=device.type == "cuda")
        feats, ok = [], []
        for images, good in loader:
            feats.append(model.encode_image(images.to(device, non_blocking=True)))
            ok.append(good)
        good = torch.cat(ok)
        bad = [self.rel_paths[i] for i in (~good).nonzero().flatten().tolist()]
        if len(bad) == len(self.paths):
            raise SearchError(f"none of the {len(bad)} images in {self.root} could be read: pass a folder of "
                              "JPEG/PNG images")
        if bad:
            self.drop(bad)
            _warn_skipped(bad, str(self.root))
        return torch.cat(feats)[good.to(feats[0].device)]


def open_gallery(path: str | os.PathLike, split: str = "test") -> ShardGallery | FolderGallery:
    """A shard set when `path` holds ``manifest.json``, otherwise a folder of images."""
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return ShardGallery(path, split)
    return FolderGallery(path)


def split_caption_queries(shards_dir: str | os.PathLike, split: str = "test", num: int = 4) -> FixedQueries:
    """The first caption of each of the first `num` distinct pids of a split, in record order.

    Used for the trainer's fixed retrieval examples and for ``irra-search --from-split-captions N``; only
    the json members of the chosen records are read. ``query_index`` is each caption's position in the
    evaluation's query list (every caption of the split, record by record).

    Raises:
        ShardError: the shard set or split cannot be read.
    """
    index = SplitIndex.load(shards_dir, load_manifest(shards_dir, verify="none"), split)
    first_query = np.cumsum(index.num_captions) - index.num_captions
    reader = RecordReader(index)
    texts, pids, positions, seen = [], [], [], set()
    for record, pid in enumerate(index.pid.tolist()):
        if len(texts) == num:
            break
        if pid in seen or index.num_captions[record] == 0:
            continue
        seen.add(pid)
        texts.append(reader.read_json(record)["captions"][0])
        pids.append(pid)
        positions.append(int(first_query[record]))
    reader.close()
    return FixedQueries(texts, torch.tensor(pids, dtype=torch.int64), tokenize(texts).view(len(texts), -1),
                        torch.tensor(positions, dtype=torch.int64))


class RetrievalExamples:
    """The trainer's retrieval grid after each evaluation: fixed queries of the evaluation split, their top-k.

    Built once per run on the main process; :meth:`save` then reuses what the evaluation just computed
    (gathered gallery and query features), so it costs a top-k and reading the few top-k images.

    Args:
        shards_dir: the run's shard set.
        split: the evaluation split.
        num_queries: fixed queries: the first caption of each of the first `num_queries` distinct pids.
        top_k: images per query.
        thumb_size: (height, width) of each thumbnail.
    """

    def __init__(self, shards_dir: str | os.PathLike, split: str = "test", *, num_queries: int = 4,
                 top_k: int = 5, thumb_size: tuple[int, int] = (128, 48)) -> None:
        self.gallery = ShardGallery(shards_dir, split)
        self.queries = split_caption_queries(shards_dir, split, num_queries)
        self.top_k = top_k
        self.thumb_size = thumb_size

    def save(self, out_path: str | os.PathLike, gallery_feats: torch.Tensor, gallery_pids: torch.Tensor,
             gallery_index: torch.Tensor, query_feats: torch.Tensor,
             query_index: torch.Tensor) -> Path | None:
        """Draw the fixed queries' top-k as a PNG.

        Args:
            out_path: the PNG (written atomically).
            gallery_feats: [G, D] the evaluation's gallery features (rows in any order).
            gallery_pids: [G] their pids.
            gallery_index: [G] their gallery indices (the loaders' ``index``).
            query_feats: [N, D] the evaluation's query features.
            query_index: [N] their query indices.

        Returns:
            The path written, or None when none of the fixed queries is among the evaluated ones.
        """
        wanted = self.queries.query_index.to(query_index.device)
        match = query_index.view(1, -1) == wanted.view(-1, 1)
        found = match.any(dim=1).cpu()
        if not found.any():
            return None
        rows = match.int().argmax(dim=1)[found.to(match.device)]
        keep = found.nonzero().flatten()
        queries = FixedQueries([self.queries.texts[i] for i in keep.tolist()], self.queries.pids[keep],
                               self.queries.caption_ids[keep], self.queries.query_index[keep])
        return save_retrieval_examples(None, gallery_feats, gallery_pids, self.gallery.load_images, queries,
                                       out_path, top_k=self.top_k, thumb_size=self.thumb_size,
                                       gallery_index=gallery_index, query_feats=query_feats[rows])


# --------------------------------------------------------------------------------------------------
# Cached gallery features


def gallery_cache_path(cache_dir: Path, weights_sha256: str, gallery: Gallery,
                       image_size: tuple[int, int]) -> Path:
    """The cache file of one (weights, gallery content, input size) combination."""
    key = json.dumps({"version": CACHE_VERSION, "weights": weights_sha256, "gallery": gallery.content_key,
                      "image_size": list(image_size)}, sort_keys=True)
    return cache_dir / f"gallery_{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


def _read_cache(path: Path, gallery: Gallery) -> torch.Tensor | None:
    """The cached features, with the gallery's unreadable images (recorded with them) dropped from it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            feats = f.get_tensor("feats")
            skipped = json.loads((f.metadata() or {}).get("skipped", "[]"))
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        logger.warning("ignoring unreadable gallery cache %s (%s); recomputing", path, err)
        return None
    num_images = len(gallery) - len(skipped)
    if feats.ndim != 2 or feats.shape[0] != num_images:
        logger.warning("ignoring gallery cache %s: %s features for %d images; recomputing", path,
                       tuple(feats.shape), num_images)
        return None
    if skipped:
        gallery.drop(skipped)
        _warn_skipped(skipped, "the gallery (as when its features were cached)")
    return feats


def cached_gallery_features(search_model: SearchModel, gallery: Gallery, *, cache_dir: str | os.PathLike,
                            batch_size: int = 64, num_workers: int = 0,
                            device: torch.device | str = "cpu") -> tuple[torch.Tensor, Path, bool]:
    """Gallery image features, read from the cache or computed (and cached) with the image tower.

    Args:
        search_model: the loaded model.
        gallery: the images.
        cache_dir: folder of the cache files (created).
        batch_size: images per forward pass.
        num_workers: DataLoader workers decoding images.
        device: where the model runs.

    Returns:
        ``(feats [G, D] fp32 on the CPU, cache file, True if it was read from the cache)``.
    """
    cache_dir = Path(cache_dir)
    weights_sha = file_digest(search_model.weights_path, cache_dir)
    path = gallery_cache_path(cache_dir, weights_sha, gallery, search_model.image_size)
    if path.is_file():
        feats = _read_cache(path, gallery)
        if feats is not None:
            return feats, path, True
    from safetensors.torch import save_file

    device = torch.device(device)
    model = search_model.model.to(device).eval()
    feats = gallery.encode(model, search_model.image_size, batch_size=batch_size, num_workers=num_workers,
                           device=device).float().cpu().contiguous()
    meta = {"weights_sha256": weights_sha, "gallery": gallery.content_key,
            "image_size": ",".join(map(str, search_model.image_size)), "num_images": str(len(gallery)),
            "skipped": json.dumps(list(getattr(gallery, "skipped", [])))}
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({"feats": feats}, tmp, metadata=meta))
    return feats, path, False


# --------------------------------------------------------------------------------------------------
# Search


@torch.no_grad()
def search(search_model: SearchModel, gallery: Gallery, gallery_feats: torch.Tensor, texts: Sequence[str],
           query_pids: Sequence[int | None] | None = None, *, top_k: int = 10,
           device: torch.device | str = "cpu") -> list[QueryResult]:
    """Rank the gallery for each text by cosine similarity of the global features.

    Args:
        search_model: the loaded model.
        gallery: the gallery `gallery_feats` were computed from.
        gallery_feats: [G, D] image features.
        texts: the queries.
        query_pids: per query, its person id or None (correctness is then unknown).
        top_k: hits per query (capped at the gallery size).
        device: where the text tower runs.

    Returns:
        One :class:`QueryResult` per text, in order.
    """
    if not texts:
        raise SearchError("no query text: pass --query TEXT, --queries-file FILE or --from-split-captions N")
    if top_k < 1:
        raise SearchError(f"--top-k must be >= 1, got {top_k}")
    query_pids = list(query_pids) if query_pids is not None else [None] * len(texts)
    device = torch.device(device)
    model = search_model.model.to(device).eval()
    warn_long_queries(texts, model.base_model.context_length)
    ids = tokenize(list(texts), context_length=model.base_model.context_length)
    text_feats = torch.cat([model.encode_text(chunk.to(device)) for chunk in ids.split(256)])
    scores, indices = top_k_matches(text_feats.cpu(), gallery_feats, top_k)
    results = []
    for q, text in enumerate(texts):
        idx = indices[q].tolist()
        hit_pids = gallery.pids[indices[q]].tolist() if gallery.pids is not None else None
        qpid = query_pids[q]
        correct = [p == qpid for p in hit_pids] if hit_pids is not None and qpid is not None else None
        results.append(QueryResult(text, qpid, scores[q].tolist(), idx, gallery.names(idx), hit_pids,
                                   correct))
    return results


def warn_long_queries(texts: Sequence[str], context_length: int) -> list[int]:
    """Say once when queries are longer than the text tower reads (the rest is cut off, as in training).

    Returns:
        The 0-based positions of the queries that are cut.
    """
    from irra_dist.tokenizer import default_tokenizer

    tok = default_tokenizer()
    room = context_length - 2  # start and end tokens
    cut = [q for q, text in enumerate(texts) if len(tok.encode(text)) > room]
    if cut:
        words, used = 0, 0
        for word in texts[cut[0]].split():
            used += len(tok.encode(word))
            if used > room:
                break
            words += 1
        logger.warning("%d query/queries longer than the model reads (%d tokens): only the start is used, "
                       "e.g. the first %d words of query %d", len(cut), context_length, words, cut[0] + 1)
    return cut


# --------------------------------------------------------------------------------------------------
# Command line


def _parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", text)
    if not match or min(int(match.group(1)), int(match.group(2))) < 1:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: write it as HxW, e.g. 384x128")
    return int(match.group(1)), int(match.group(2))


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
    parser.add_argument("--image-size", type=_parse_size, default=None, metavar="HxW",
                        help="input size override (default: from the run config or the weights file)")
    parser.add_argument("--stride-size", type=int, default=None, help="patch stride override")
    parser.add_argument("--thumb-size", type=_parse_size, default=(128, 48), metavar="HxW",
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
