"""A gallery index on disk: faiss over L2-normalised image features, the images' locations and pids, and
the fingerprint of the model that embedded them.

An index folder holds four files, each written atomically, ``index.json`` last (it records the others'
sizes, so a folder whose files do not belong together is detected as corrupt):

- ``index.faiss``: the faiss index. Features are L2-normalised, so inner product is the cosine similarity
  that evaluation and ``irra-search`` rank by (IRRA_SPEC 5). Kinds: ``flat`` (exact, the default),
  ``ivfpq`` (inverted lists + product quantisation, for millions of images) and ``hnsw`` (a graph).
- ``features.npy``: the normalised features ``[N, D]`` float32, so that adding images or switching the kind
  of index never re-embeds what is already embedded.
- ``items.json``: per image, where it comes from (a folder and its relative path, or a shard set, split and
  record position), its printable name, its pid when known, and a key that changes when the file changes.
- ``index.json``: the model's fingerprint (SHA-256 of the weights file plus the input size), the index kind
  and its parameters, the counts and the file sizes.

This module needs numpy, faiss and PIL only (no torch): the ONNX query path uses it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from irra_dist.fileio import atomic_write, atomic_write_text

INDEX_FILE = "index.faiss"
FEATURES_FILE = "features.npy"
ITEMS_FILE = "items.json"
META_FILE = "index.json"
FORMAT = "irra_dist.gallery_index"
FORMAT_VERSION = 1
PQ_CODES = 256
"""Product quantisation learns 256 centroids per sub-vector (8-bit codes), so it needs 256+ images."""


class GalleryIndexError(ValueError):
    """An index, or an index request, that cannot be used; the message is one line naming the fix."""


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise GalleryIndexError("faiss is not installed: pip install 'irra_dist[serve]'") from None
    return faiss


# --------------------------------------------------------------------------------------------------
# Index kinds


@dataclass(frozen=True)
class IndexSpec:
    """Which faiss index to build, and its search-time defaults.

    Args:
        kind: "flat" (exact inner product), "ivfpq" or "hnsw".
        nlist: ivfpq: inverted lists (k-means cells).
        pq_m: ivfpq: sub-vectors per feature (must divide the width); each is stored in one byte.
        nprobe: ivfpq: cells visited per query (more: better recall, slower).
        hnsw_m: hnsw: graph neighbours per node.
        ef_search: hnsw: candidate list length per query.
    """

    kind: str = "flat"
    nlist: int = 0
    pq_m: int = 0
    nprobe: int = 0
    hnsw_m: int = 0
    ef_search: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivfpq", "hnsw"):
            raise GalleryIndexError(f"unknown index kind {self.kind!r}: use flat, ivfpq or hnsw")
        if self.kind == "ivfpq" and min(self.nlist, self.pq_m, self.nprobe) < 1:
            raise GalleryIndexError("an IVF-PQ index needs --ivf NLIST >= 1, --pq M >= 1 and --nprobe >= 1")
        if self.kind == "hnsw" and min(self.hnsw_m, self.ef_search) < 1:
            raise GalleryIndexError("an HNSW index needs --hnsw M >= 1 and --ef-search >= 1")

    def describe(self) -> str:
        """A short name, e.g. ``IVF1024,PQ64 (nprobe 16)``."""
        if self.kind == "ivfpq":
            return f"IVF{self.nlist},PQ{self.pq_m} (nprobe {self.nprobe})"
        if self.kind == "hnsw":
            return f"HNSW{self.hnsw_m} (efSearch {self.ef_search})"
        return "Flat inner product (exact)"


def normalize_rows(feats: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm as contiguous float32 (an all-zero row stays zero)."""
    feats = np.asarray(feats, dtype=np.float32)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return np.ascontiguousarray(feats / np.maximum(norms, 1e-12), dtype=np.float32)


def build_faiss_index(feats: np.ndarray, spec: IndexSpec) -> Any:
    """A faiss index over `feats` (already normalised, ``[N, D]`` float32), trained when the kind needs it.

    Raises:
        GalleryIndexError: parameters that do not fit the data (too few images for IVF-PQ, ``pq_m`` not
            dividing the width).
    """
    faiss = _faiss()
    num, dim = feats.shape
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = spec.ef_search
    else:
        if dim % spec.pq_m:
            raise GalleryIndexError(f"--pq {spec.pq_m} does not divide the feature width {dim}: pick M among "
                                    f"{[m for m in (4, 8, 16, 32, 64, 128) if dim % m == 0]}")
        if num < max(spec.nlist, PQ_CODES):
            raise GalleryIndexError(f"an IVF{spec.nlist},PQ index needs at least {max(spec.nlist, PQ_CODES)} "
                                    f"images to train, the gallery has {num}: use the exact index (no --ivf) "
                                    "or a smaller --ivf")
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, spec.nlist, spec.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.train(feats)
        index.nprobe = spec.nprobe
    index.add(feats)
    return index


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over queries of ``|found[:, :k] & exact[:, :k]| / k`` (ids; -1 never counts)."""
    hits = [len(set(f[:k].tolist()) & set(e[:k].tolist()) - {-1}) for f, e in zip(found, exact)]
    return float(np.mean(hits)) / k


def model_fingerprint(weights_sha256: str, image_size: Sequence[int]) -> str:
    """Identifies the image features a model produces: its weights file and its input size."""
    key = f"{weights_sha256}:{int(image_size[0])}x{int(image_size[1])}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------------
# Items: where each indexed image comes from


@dataclass
class Items:
    """Column lists, one entry per indexed image, in index order.

    ``sources`` lists the galleries (``{"kind": "folder", "root": ...}`` or ``{"kind": "shards", "root": ...,
    "split": ...}``); each image names its source by position, and its ``locator`` within it (relative path,
    or record position in the split as a string).
    """

    sources: list[dict[str, str]]
    source: list[int]
    locator: list[str]
    name: list[str]
    key: list[str]
    pid: list[int | None]

    def __len__(self) -> int:
        return len(self.key)

    @classmethod
    def empty(cls) -> Items:
        return cls([], [], [], [], [], [])

    def identity(self, i: int) -> tuple[str, str, str]:
        """What names one image regardless of its content: (source root, split, locator)."""
        src = self.sources[self.source[i]]
        return src["root"], src.get("split", ""), self.locator[i]

    def take(self, rows: Sequence[int]) -> Items:
        """The items at `rows` (sources kept)."""
        return Items(list(self.sources), [self.source[r] for r in rows], [self.locator[r] for r in rows],
                     [self.name[r] for r in rows], [self.key[r] for r in rows], [self.pid[r] for r in rows])

    def extend(self, other: Items) -> None:
        """Append `other`'s items, merging its sources into ours."""
        mapping = []
        for src in other.sources:
            if src not in self.sources:
                self.sources.append(src)
            mapping.append(self.sources.index(src))
        self.source += [mapping[s] for s in other.source]
        self.locator += other.locator
        self.name += other.name
        self.key += other.key
        self.pid += other.pid


def merge_items(old: Items, new: Items) -> tuple[Items, list[int | None]]:
    """The index's items after adding a gallery listing to an existing index.

    Every image of `new` is kept; an old image that `new` lists again (same source and locator) is replaced
    by its new entry; other old images stay (an index may gather several galleries).

    Returns:
        ``(items, reuse)``: the merged items (old ones first, in their order), and per merged item the row
        of `old` whose features can be reused (same key), or None when the image must be embedded.
    """
    listed = {new.identity(i) for i in range(len(new))}
    old_by_key = {k: r for r, k in enumerate(old.key)}
    kept = [r for r in range(len(old)) if old.identity(r) not in listed]
    merged = old.take(kept)
    merged.extend(new)
    reuse: list[int | None] = list(kept) + [old_by_key.get(k) for k in new.key]
    return merged, reuse


# --------------------------------------------------------------------------------------------------
# Reading and writing


@dataclass
class IndexMeta:
    """``index.json``."""

    num_items: int
    dim: int
    spec: IndexSpec
    model: dict[str, Any]
    """``fingerprint``, ``weights_sha256``, ``image_size``, ``source`` (run folder or weights file) and
    ``source_kind`` ("run" or "checkpoint"), ``weights`` ("best" or "last")."""
    files: dict[str, int]
    has_pids: bool

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "num_items": self.num_items,
                           "dim": self.dim, "index": asdict(self.spec), "model": self.model,
                           "files": self.files, "has_pids": self.has_pids}, indent=1) + "\n"


def write_index(out_dir: str | os.PathLike, feats: np.ndarray, items: Items, spec: IndexSpec,
                model: dict[str, Any], *, normalized: bool = False) -> IndexMeta:
    """Build the faiss index over `feats` and write the index folder (see the module docstring).

    Args:
        out_dir: the index folder (created).
        feats: ``[N, D]`` image features in item order.
        items: the N images.
        spec: the kind of index.
        model: the ``model`` section of ``index.json`` (at least ``fingerprint``).
        normalized: `feats` are already L2-normalised (features reused from an index stay bit-identical;
            normalising a unit vector again may change its last bit).

    Returns:
        What was written to ``index.json``.
    """
    faiss = _faiss()
    if len(feats) != len(items) or len(items) == 0:
        raise GalleryIndexError(f"cannot index {len(feats)} features for {len(items)} images: nothing to "
                                "index")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    feats = np.ascontiguousarray(feats, dtype=np.float32) if normalized else normalize_rows(feats)
    index = build_faiss_index(feats, spec)

    def save_features(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, feats)

    atomic_write(out / FEATURES_FILE, save_features)
    atomic_write_text(out / ITEMS_FILE, json.dumps(asdict(items)))
    atomic_write(out / INDEX_FILE, lambda tmp: faiss.write_index(index, tmp))
    files = {name: (out / name).stat().st_size for name in (INDEX_FILE, FEATURES_FILE, ITEMS_FILE)}
    meta = IndexMeta(len(items), int(feats.shape[1]), spec, model, files,
                     has_pids=all(p is not None for p in items.pid))
    atomic_write_text(out / META_FILE, meta.to_json())
    return meta


def read_meta(index_dir: str | os.PathLike) -> IndexMeta:
    """``index.json`` of an index folder, checked against the files beside it.

    Raises:
        GalleryIndexError: no index there, or its files are missing, truncated or from another build.
    """
    root = Path(index_dir)
    path = root / META_FILE
    if not path.is_file():
        raise GalleryIndexError(f"no index at {root} ({META_FILE} missing): build one with "
                                "irra-index build RUN --gallery FOLDER --out DIR")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != FORMAT or raw.get("version") != FORMAT_VERSION:
            raise ValueError(f"format {raw.get('format')!r} version {raw.get('version')!r}")
        meta = IndexMeta(int(raw["num_items"]), int(raw["dim"]), IndexSpec(**raw["index"]),
                         dict(raw["model"]), {str(k): int(v) for k, v in raw["files"].items()},
                         bool(raw["has_pids"]))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise GalleryIndexError(f"{path} is not an irra_dist index description ({err}): rebuild the index "
                                "with irra-index build") from None
    for name, size in meta.files.items():
        file = root / name
        actual = file.stat().st_size if file.is_file() else None
        if actual != size:
            state = "missing" if actual is None else f"{actual} bytes, {META_FILE} says {size}"
            raise GalleryIndexError(f"index {root} is corrupt: {name} is {state}; rebuild it with "
                                    "irra-index build (already embedded images are kept when possible)")
    return meta


def read_items(index_dir: str | os.PathLike) -> Items:
    """``items.json`` of an index folder."""
    path = Path(index_dir) / ITEMS_FILE
    try:
        return Items(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as err:
        raise GalleryIndexError(f"index {path.parent} is corrupt: cannot read {ITEMS_FILE} ({err}); rebuild "
                                "it with irra-index build") from None


def read_features(index_dir: str | os.PathLike, num_items: int, dim: int) -> np.ndarray:
    """``features.npy`` (memory-mapped), checked to be ``[num_items, dim]``."""
    path = Path(index_dir) / FEATURES_FILE
    try:
        feats = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise GalleryIndexError(f"index {path.parent} is corrupt: cannot read {FEATURES_FILE} ({err}); "
                                "rebuild it with irra-index build") from None
    if feats.shape != (num_items, dim):
        raise GalleryIndexError(f"index {path.parent} is corrupt: {FEATURES_FILE} is {feats.shape}, expected "
                                f"({num_items}, {dim}); rebuild it with irra-index build")
    return feats


class GalleryIndex:
    """A loaded index folder: search it, name and load its images.

    Args:
        index_dir: the folder written by :func:`write_index`.

    Raises:
        GalleryIndexError: missing or corrupt index.
    """

    def __init__(self, index_dir: str | os.PathLike) -> None:
        faiss = _faiss()
        self.root = Path(index_dir)
        self.meta = read_meta(self.root)
        self.items = read_items(self.root)
        try:
            self.index = faiss.read_index(str(self.root / INDEX_FILE))
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise GalleryIndexError(f"index {self.root} is corrupt: cannot read {INDEX_FILE} ({first}); "
                                    "rebuild it with irra-index build") from None
        if not (self.index.ntotal == len(self.items) == self.meta.num_items) or self.index.d != self.meta.dim:
            raise GalleryIndexError(f"index {self.root} is corrupt: {self.index.ntotal} vectors of width "
                                    f"{self.index.d}, {len(self.items)} images, {META_FILE} says "
                                    f"{self.meta.num_items} x {self.meta.dim}; rebuild it with irra-index "
                                    "build")
        self.pids = np.array(self.items.pid, dtype=np.int64) if self.meta.has_pids else None
        self._readers: dict[int, Any] = {}

    @property
    def fingerprint(self) -> str:
        return str(self.meta.model.get("fingerprint", ""))

    def __len__(self) -> int:
        return self.meta.num_items

    def search(self, query_feats: np.ndarray, top_k: int, *, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product of the normalised features (= cosine).

        Args:
            query_feats: ``[Q, D]`` text features (any norm).
            top_k: hits per query, capped at the index size.
            nprobe, ef_search: override the index's defaults (ivfpq, hnsw).

        Returns:
            ``(scores [Q, k] float32, indices [Q, k] int64)``, best first; an approximate index may return
            fewer than k hits for a query, marked by index -1.
        """
        if top_k < 1:
            raise GalleryIndexError(f"--top-k must be >= 1, got {top_k}")
        queries = normalize_rows(query_feats)
        if queries.ndim != 2 or queries.shape[1] != self.meta.dim:
            raise GalleryIndexError(f"query features of width {queries.shape[-1]} for an index of width "
                                    f"{self.meta.dim}: query with the model that built the index")
        if nprobe is not None and self.meta.spec.kind == "ivfpq":
            self.index.nprobe = nprobe
        if ef_search is not None and self.meta.spec.kind == "hnsw":
            self.index.hnsw.efSearch = ef_search
        return self.index.search(queries, min(top_k, len(self)))

    def names(self, indices: Sequence[int]) -> list[str]:
        return [self.items.name[int(i)] for i in indices]

    def image_bytes(self, i: int) -> bytes:
        """The encoded image file of item `i`."""
        src_id = self.items.source[i]
        src = self.items.sources[src_id]
        locator = self.items.locator[i]
        try:
            if src["kind"] == "folder":
                return (Path(src["root"]) / locator).read_bytes()
            split = self._readers.get(src_id)
            if split is None:
                from irra_dist.data.shards import SplitIndex, load_manifest

                split = SplitIndex.load(src["root"], load_manifest(src["root"], verify="none"), src["split"])
                self._readers[src_id] = split
            from irra_dist.data.shards import read_record_members

            members = read_record_members(split, int(locator))  # no wids: it would import torch
            members.pop("json", None)
            if len(members) != 1:
                raise KeyError(f"record {locator} has {len(members)} image members, not one")
            return next(iter(members.values()))
        except Exception as err:  # noqa: BLE001 - any failure to fetch is the same one-line message
            raise GalleryIndexError(f"cannot read indexed image {self.items.name[i]} from {src['root']} "
                                    f"({type(err).__name__}: {err}): was the gallery moved? rebuild the "
                                    "index") from None

    def load_images(self, indices: Sequence[int]) -> list[Image.Image]:
        """The decoded RGB images of the given items, in order."""
        images = []
        for i in indices:
            try:
                with Image.open(io.BytesIO(self.image_bytes(int(i)))) as img:
                    images.append(img.convert("RGB"))
            except (OSError, ValueError, SyntaxError, EOFError) as err:
                raise GalleryIndexError(f"cannot decode indexed image {self.items.name[int(i)]} ({err}): "
                                        "replace it and rebuild the index") from None
        return images
