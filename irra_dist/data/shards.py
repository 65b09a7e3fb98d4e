"""WebDataset tar shards of a parsed dataset, the manifest that describes them, and random access into them.

Layout of a shard folder (``irra-build-shards --out DIR``)::

    DIR/manifest.json            written last: its presence marks a complete set
    DIR/train-000000.tar ...     one WebDataset sample per IMAGE: <key>.<ext> (image) + <key>.json
    DIR/train-index.json         per record (image, in shard order): shard number, pid, image_id, number of
                                 captions (so loaders plan epochs without opening a tar)
    DIR/train-shards.json        the split's wids shard list (``wids.ShardListDataset("train-shards.json")``)
    DIR/test-*, DIR/val-*        the same for the evaluation splits

A record's json member holds ``pid``, ``image_id``, ``rel_path`` and ``captions``. Keys are the record's
position in its split (``%08d``). The tars are written by ``webdataset.TarWriter`` and read by ``wids``, so
``webdataset.WebDataset(urls).decode("pil")`` or ``wids.ShardListDataset`` read a set with no irra_dist code;
a set written by other tools in this layout becomes trainable once
``irra-build-shards --index-only --out DIR`` has written its index files and manifest. Images are the
original file bytes, or with ``pre_resize`` the image converted to RGB and resized to the training size
with bilinear (as the official Resize), stored losslessly as PNG or raw PPM; resizing such an image to the
same size again is the identity, so training pixels are the same either way.

Builds are deterministic (fixed member order, mtime 0, uid/gid 0, no user names, USTAR headers, no
timestamps in the manifest): the same input gives byte-identical files. Every file is written under a
temporary name and renamed when complete; an existing manifest is removed before anything else is written
and the new one is written last, so an interrupted build never leaves a set that looks complete.

``data.shards`` may also be an ``http(s)://`` URL or a ``pipe:`` command (see :mod:`irra_dist.data.sources`):
remote shards are fetched into a local cache and verified against the manifest's hashes.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import struct
import tarfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from irra_dist.data.parsers import (
    SPLITS,
    ImageRecord,
    ParsedDataset,
    parse_dataset,
)
from irra_dist.data.sources import ShardError, ShardStore, SourceError
from irra_dist.fileio import AtomicFile, atomic_write_bytes, file_sha256
from irra_dist.image_size import parse_image_size

logger = logging.getLogger(__name__)

FORMAT_NAME = "irra_dist.shards"
BUILDER_VERSION = 2
"""Bumped whenever the shard layout changes; loaders refuse sets built by a newer builder. Version 2 writes
through webdataset's TarWriter (members of a sample in extension order) and adds the wids shard lists; the
loaders still read version-1 sets (their index files hold the columns version 2 needs)."""
MANIFEST_NAME = "manifest.json"
DEFAULT_SHARD_SIZE = 512
"""Images per shard: 67 train shards for CUHK-PEDES (34,054 images), enough to spread over many workers."""
PRE_RESIZE_FORMATS = ("png", "ppm")
"""Lossless formats for pre-resized images: PNG is compact; PPM is raw RGB (about 2.3x PNG's size at
384x128) and decodes about 30x faster, so loading skips both the decode and the resize cost."""
PNG_COMPRESS_LEVEL = 1
"""zlib level for pre-resized PNGs: lossless at any level; 1 encodes about 5x faster than 6 and decodes as
fast, for files about 15% larger."""

_REBUILD_HINT = "rebuild it with irra-build-shards --dataset NAME --root DIR --out {out} --overwrite"
_SHARD_RE = re.compile(r"^(train|val|test)-\d{6}\.tar$")
_INDEX_RE = re.compile(r"^(train|val|test)-(index|shards)\.json$")
_TMP_RE = re.compile(r"^\..+\.tmp$")
_VERIFIED_STAMP = ".verified.json"
_INDEX_COLUMNS = ("shard", "pid", "image_id", "num_captions")
_TAR_DEFAULTS = {"user": "", "group": "", "mode": 0o644, "mtime": 0}
"""Fixed member metadata for webdataset's TarWriter, so that rebuilds are byte-identical."""
OPEN_SHARDS = 128
"""Shards each reading process keeps open (wids' LRU): all 67 train shards of CUHK-PEDES at the default size;
beyond it, random access re-opens and re-indexes shards (wids warns above 200)."""

VerifyMode = bool | Literal["none", "size", "full"]


class RecordError(OSError):
    """One record cannot be read (its bytes are cut short); the loader skips it and counts it."""


# --------------------------------------------------------------------------------------------------
# Writing


class _HashingWriter:
    """An :class:`~irra_dist.fileio.AtomicFile` that hashes and counts what it is given (a shard's tar)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._out = AtomicFile(path)
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        if self._out.file.closed:
            return  # an aborted shard: its tar stream may still flush when garbage-collected
        self._out.file.write(data)
        self._sha.update(data)
        self.size += len(data)

    def commit(self) -> dict[str, Any]:
        self._out.commit()
        return {"file": self.path.name, "bytes": self.size, "sha256": self._sha.hexdigest()}

    def abort(self) -> None:
        self._out.abort()


def _atomic_write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    """Write `data` atomically; return its manifest entry (file name, size, SHA-256)."""
    atomic_write_bytes(path, data)
    return {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _json_bytes(obj: Any, indent: int | None = None) -> bytes:
    separators = (",", ": ") if indent else (",", ":")
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=indent, separators=separators).encode()


def _parse_size(pre_resize: tuple[int, int] | str | None) -> tuple[int, int] | None:
    try:
        return None if pre_resize is None else parse_image_size(pre_resize, "pre_resize")
    except ValueError as err:
        raise ShardError(str(err)) from None


def _encode_image(path: str, size: tuple[int, int] | None, fmt: str) -> tuple[bytes, str]:
    """The bytes stored for one image and their extension: the original file, or resized and lossless."""
    data = Path(path).read_bytes()
    if size is None:
        ext = Path(path).suffix.lower().lstrip(".") or "img"
        return data, ext
    with Image.open(io.BytesIO(data)) as img:
        # The official order: convert to RGB, then Resize((H, W)) bilinear.
        resized = img.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
    buf = io.BytesIO()
    if fmt == "png":
        resized.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        resized.save(buf, format="PPM")
    return buf.getvalue(), fmt


def _ordered_map(pool: Executor, fn: Callable[..., Any], items: Iterable[tuple[Any, ...]],
                 window: int) -> Iterator[Future]:
    """Futures of ``fn(*item)`` in input order, with at most `window` in flight (bounded memory)."""
    pending: collections.deque[Future] = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, *item))
        if len(pending) >= window:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


def _our_files(out: Path) -> list[Path]:
    """Files in `out` that a build writes (shards, indexes, temporaries, the stamp), manifest excluded."""
    if not out.is_dir():
        return []
    return [p for p in out.iterdir() if p.is_file() and (
        _SHARD_RE.match(p.name) or _INDEX_RE.match(p.name) or _TMP_RE.match(p.name)
        or p.name == _VERIFIED_STAMP)]


def _check_destination(out: Path, parsed: ParsedDataset, overwrite: bool) -> None:
    """Refuse to replace a different dataset (or foreign files) unless `overwrite` is set."""
    manifest_path = out / MANIFEST_NAME
    hint = "pass --overwrite (overwrite=True) to replace it, or choose another --out"
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_bytes())
            same = (old.get("dataset") == parsed.name
                    and old.get("annotation_sha256") == parsed.annotation_sha256
                    and old.get("val_from_train") == parsed.val_from_train)
            described = f"{old.get('dataset')!r} (annotation sha256 {str(old.get('annotation_sha256'))[:12]})"
        except (ValueError, AttributeError):
            same, described = False, "an unreadable manifest"
        if not same and not overwrite:
            raise ShardError(f"{out} already holds shards of {described}, not of {parsed.name!r} (annotation "
                             f"sha256 {parsed.annotation_sha256[:12]}): {hint}")
        return
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out} is a file, not a folder: choose a folder for the shards")
    ours = set(_our_files(out))
    foreign = [p.name for p in out.iterdir() if p not in ours] if out.is_dir() else []
    if foreign and not overwrite:
        found = ", ".join(sorted(foreign)[:3])
        raise ShardError(f"{out} is not empty and holds no {MANIFEST_NAME} (found {found}): {hint}")


def build_shards(parsed_or_name: ParsedDataset | str, root: str | os.PathLike | None,
                 out_dir: str | os.PathLike, *, shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 8,
                 pre_resize: tuple[int, int] | str | None = None, pre_resize_format: str = "png",
                 overwrite: bool = False,
                 skip_bad: bool = False, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write a dataset as WebDataset tar shards plus ``manifest.json`` (see the module docstring).

    Args:
        parsed_or_name: a :class:`ParsedDataset`, or a dataset name parsed from `root`.
        root: the dataset folder or data root (ignored when a ParsedDataset is given).
        out_dir: destination folder (created).
        shard_size: images per shard.
        workers: threads reading images; with `pre_resize`, processes decoding, resizing and encoding them.
        pre_resize: store images resized to this ``(height, width)`` (or ``"HxW"``) with bilinear, in a
            lossless format, instead of the original bytes.
        pre_resize_format: ``"png"`` or ``"ppm"`` (see :data:`PRE_RESIZE_FORMATS`).
        overwrite: allow replacing a different dataset's shards (or foreign files) in `out_dir`.
        skip_bad: skip (and count) records whose annotation is bad or whose image cannot be read or, with
            `pre_resize`, decoded, instead of stopping at the first.
        progress: called with the number of images done since its last call (e.g. a tqdm bar's
            ``update``); None: silent.

    Returns:
        The manifest, as written to ``out_dir/manifest.json``.

    Raises:
        ShardError: bad arguments, an unreadable image without `skip_bad`, or `out_dir` holding another
            dataset without `overwrite`.
        DatasetError, DatasetNotFoundError: from parsing, when a name is given.
    """
    if shard_size < 1:
        raise ShardError(f"shard_size must be >= 1, got {shard_size}: pass --shard-size N with N >= 1")
    if workers < 1:
        raise ShardError(f"workers must be >= 1, got {workers}: pass --workers N with N >= 1")
    size = _parse_size(pre_resize)
    if pre_resize_format not in PRE_RESIZE_FORMATS:
        raise ShardError(f"pre_resize_format must be one of {', '.join(PRE_RESIZE_FORMATS)}, got "
                         f"{pre_resize_format!r}")
    fmt = pre_resize_format if size else "original"
    if isinstance(parsed_or_name, ParsedDataset):
        parsed = parsed_or_name
    else:
        if root is None:
            raise ShardError("a dataset name needs its root folder: pass --root DIR")
        parsed = parse_dataset(parsed_or_name, root, skip_bad=skip_bad)
    out = Path(out_dir)
    _check_destination(out, parsed, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    # A previous set stops looking complete before any of its files change.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for stale in _our_files(out):
        if _TMP_RE.match(stale.name) or stale.name == _VERIFIED_STAMP:
            stale.unlink()

    total = sum(len(parsed.splits[s]) for s in SPLITS)
    logger.info("writing %d images of %s to %s (%s)", total, parsed.name, out,
                f"pre-resized to {size[0]}x{size[1]} {fmt.upper()}" if size else "original bytes")
    build_skipped: list[str] = []
    splits: dict[str, Any] = {}
    # Reading files releases the GIL; PNG encoding does not, so pre-resizing runs in processes.
    executor = ProcessPoolExecutor if size and workers > 1 else ThreadPoolExecutor
    with executor(max_workers=workers) as pool:
        for split in SPLITS:
            splits[split] = _write_split(out, split, parsed.splits[split], pool, size, fmt, shard_size,
                                         workers, skip_bad, build_skipped, progress)
    if build_skipped:
        logger.warning("skipped %d unreadable image(s); first: %s", len(build_skipped), build_skipped[0])

    manifest = {
        "format": FORMAT_NAME,
        "builder_version": BUILDER_VERSION,
        "dataset": parsed.name,
        "annotation_file": Path(parsed.annotation_path).name,
        "annotation_sha256": parsed.annotation_sha256,
        "image_format": fmt,
        "image_size": list(size) if size else None,
        "shard_size": shard_size,
        # The official num_classes counts every parsed train pid: an image skipped here (or one without
        # captions) must not shrink the classifier while other pids up to N-1 still occur.
        "num_train_ids": parsed.num_train_ids,
        # "per_image": built without identities (each image its own), so the trainer turns the ID loss off.
        "identities": parsed.identities,
        "num_skipped": parsed.num_skipped + len(build_skipped),
        # Set when the val split was carved from the training identities (irra-build-shards --val-ids N).
        "val_from_train": parsed.val_from_train,
        "splits": splits,
    }
    _atomic_write_bytes(out / MANIFEST_NAME, _json_bytes(manifest, indent=1) + b"\n")
    listed = {MANIFEST_NAME} | {entry["file"] for entry in _listed_files(manifest)}
    for stale in _our_files(out):
        if stale.name not in listed:
            stale.unlink()
    # The dataset table was logged when the annotations were parsed; not twice.
    logger.info("%s shards complete in %s", parsed.name, out)
    return manifest


def _write_split(out: Path, split: str, records: list[ImageRecord], pool: Executor,
                 size: tuple[int, int] | None, fmt: str, shard_size: int, workers: int, skip_bad: bool,
                 build_skipped: list[str], progress: Callable[[int], None] | None) -> dict[str, Any]:
    """Write one split's shards (webdataset ShardWriter), index file and wids shard list; return its entry."""
    columns: dict[str, list[int]] = {name: [] for name in _INDEX_COLUMNS}
    shards: list[dict[str, Any]] = []
    open_files: dict[str, _HashingWriter] = {}
    in_shard = 0

    def open_shard(fname: str) -> _HashingWriter:
        nonlocal in_shard
        in_shard = 0
        open_files[fname] = _HashingWriter(Path(fname))
        return open_files[fname]

    def close_shard(fname: str) -> None:
        entry = open_files[fname].commit()
        del open_files[fname]
        entry["num_records"] = in_shard
        shards.append(entry)

    writer: Any = None  # a webdataset.ShardWriter once the first sample arrives
    pids: set[int] = set()
    num_captions = 0
    try:
        futures = _ordered_map(pool, _encode_image, ((r.path, size, fmt) for r in records),
                               window=8 * workers)
        for record, future in zip(records, futures):
            if progress is not None:
                progress(1)
            try:
                image, ext = future.result()
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                reason = f"{split} image {record.path} ({record.rel_path}) cannot be read: {err}"
                if not skip_bad:
                    raise ShardError(f"{reason}: restore the file, or pass --skip-bad to skip it") from None
                build_skipped.append(reason)
                continue
            if writer is None:  # opened on the first image, so an empty split writes no empty tar
                import webdataset as wds  # here, not at the top: webdataset imports torch, readers don't

                writer = wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size,
                                         maxsize=float("inf"), verbose=0, opener=open_shard, post=close_shard,
                                         encoder=False, **_TAR_DEFAULTS)
            meta = _json_bytes({"pid": record.pid, "image_id": record.image_id, "rel_path": record.rel_path,
                                "captions": list(record.captions)})
            # ShardWriter closes a full shard (close_shard) and opens the next (open_shard) on its own.
            writer.write({"__key__": f"{len(columns['pid']):08d}", ext: image, "json": meta})
            in_shard += 1
            columns["shard"].append(len(shards))
            columns["pid"].append(record.pid)
            columns["image_id"].append(record.image_id)
            columns["num_captions"].append(len(record.captions))
            pids.add(record.pid)
            num_captions += len(record.captions)
        if writer is not None:
            writer.close()
    except BaseException:
        for pending in open_files.values():
            pending.abort()
        raise

    return _split_entry(out, split, shards, columns, num_ids=len(pids), num_captions=num_captions)


def _split_entry(out: Path, split: str, shards: list[dict[str, Any]], columns: dict[str, list[int]], *,
                 num_ids: int, num_captions: int) -> dict[str, Any]:
    """Write a split's index file and wids shard list; return the split's manifest entry."""
    index = {"split": split, "shards": [s["file"] for s in shards], **columns}
    entry = {"num_ids": num_ids, "num_images": len(columns["pid"]), "num_captions": num_captions,
             "num_samples": num_captions,
             "index": _atomic_write_bytes(out / f"{split}-index.json", _json_bytes(index)),
             "shards": shards}
    if shards:  # wids refuses an empty shard list
        shardlist = {"wids_version": 1, "name": split,
                     "shardlist": [{"url": s["file"], "nsamples": s["num_records"], "filesize": s["bytes"]}
                                   for s in shards]}
        entry["shardlist"] = _atomic_write_bytes(out / f"{split}-shards.json",
                                                 _json_bytes(shardlist, indent=1))
    return entry


def index_shards(shards_dir: str | os.PathLike, *, dataset: str | None = None) -> dict[str, Any]:
    """Write the index files, wids shard lists and manifest for tars that another tool wrote.

    The tars must follow the documented layout: files ``<split>-*.tar`` (split train, val or test; read in
    name order) in `shards_dir`, each sample one image member plus ``<key>.json`` holding an integer
    ``pid`` and a list of ``captions`` (``image_id`` and ``rel_path`` optional). Samples are grouped by
    wids' own reader, so the counts recorded here are the ones the loaders see.

    Args:
        shards_dir: the folder holding the tars (the manifest is written there).
        dataset: the name recorded in the manifest (default: the folder name).

    Returns:
        The manifest, as written.

    Raises:
        ShardError: no train tars, or a sample that does not follow the layout (named with its shard).
    """
    out = Path(shards_dir)
    tars = {split: sorted(p for p in out.glob(f"{split}-*.tar") if p.is_file()) for split in SPLITS} \
        if out.is_dir() else {}
    if not tars or not tars["train"]:
        raise ShardError(f"no train-*.tar in {out}: put the shards there named <split>-NNNNNN.tar (split "
                         "train, val or test)")
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    splits: dict[str, Any] = {}
    train_pids: set[int] = set()
    for split in SPLITS:
        columns: dict[str, list[int]] = {name: [] for name in _INDEX_COLUMNS}
        shards: list[dict[str, Any]] = []
        pids: set[int] = set()
        num_captions = 0
        for path in tars[split]:
            samples = _wids().wids.IndexedTarSamples(path=str(path))
            try:
                for i in range(len(samples)):
                    members = samples[i]
                    try:
                        meta = json.loads(members[".json"].read())
                        pid, captions = int(meta["pid"]), meta["captions"]
                        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                            raise TypeError("captions is not a list of strings")
                        images = [k for k in members if not k.startswith("__") and k != ".json"]
                        if len(images) != 1:
                            raise ValueError(f"{len(images)} image members")
                        image_id = int(meta.get("image_id", len(columns["pid"])))
                    except (KeyError, ValueError, TypeError, AttributeError) as err:
                        raise ShardError(f"{path}: sample {members['__key__']!r} does not follow the layout "
                                         f"({err}): each sample needs one image and <key>.json with an "
                                         "integer pid and a list of captions") from None
                    columns["shard"].append(len(shards))
                    columns["pid"].append(pid)
                    columns["image_id"].append(image_id)
                    columns["num_captions"].append(len(captions))
                    pids.add(pid)
                    num_captions += len(captions)
                num_records = len(samples)
            finally:
                samples.close()
            shards.append({"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path),
                           "num_records": num_records})
        splits[split] = _split_entry(out, split, shards, columns, num_ids=len(pids),
                                     num_captions=num_captions)
        if split == "train":
            train_pids = pids
    manifest = {
        "format": FORMAT_NAME,
        "builder_version": BUILDER_VERSION,
        "dataset": dataset or out.resolve().name,
        "annotation_file": None,
        "annotation_sha256": None,
        "image_format": "original",
        "image_size": None,
        "shard_size": max(s["num_records"] for e in splits.values() for s in e["shards"]),
        # Pids are class indices: the classifier needs max + 1 outputs even if some pids are unused.
        "num_train_ids": max(train_pids) + 1 if train_pids else 0,
        "num_skipped": 0,
        "indexed_only": True,
        "splits": splits,
    }
    _atomic_write_bytes(out / MANIFEST_NAME, _json_bytes(manifest, indent=1) + b"\n")
    return manifest


# --------------------------------------------------------------------------------------------------
# Loading and verifying


def _normalize_verify(verify: VerifyMode) -> str:
    mode = {True: "size", False: "none"}.get(verify, verify) if isinstance(verify, bool) else verify
    if mode not in ("none", "size", "full"):
        raise ValueError(f"verify must be True, False, 'none', 'size' or 'full', got {verify!r}")
    return mode


def _listed_files(manifest: dict[str, Any]) -> Iterable[dict[str, Any]]:
    for split in manifest["splits"].values():
        yield split["index"]
        if "shardlist" in split:
            yield split["shardlist"]
        yield from split["shards"]


def _stamp_for(manifest_bytes: bytes, files: list[tuple[Path, os.stat_result]]) -> dict[str, Any]:
    return {"manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "files": {p.name: [st.st_size, st.st_mtime_ns] for p, st in files}}


def _parse_manifest(raw: bytes, where: str, hint: str) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
        ok = manifest.get("format") == FORMAT_NAME and isinstance(manifest.get("splits"), dict)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise ShardError(f"{where} is not an irra_dist shard manifest: {hint}")
    if manifest.get("builder_version", 0) > BUILDER_VERSION:
        raise ShardError(f"{where} was written by a newer shard builder (version "
                         f"{manifest['builder_version']} > {BUILDER_VERSION}): update irra_dist or {hint}")
    return manifest


def _load_remote_manifest(store: ShardStore) -> dict[str, Any]:
    url = store.url(MANIFEST_NAME)
    try:
        raw = store.read_bytes(MANIFEST_NAME)
    except SourceError as err:
        raise ShardError(f"cannot read {MANIFEST_NAME} of data.shards {store.location}: {err}: check the URL "
                         "or command and the network, and that the whole shard folder (manifest included) is "
                         "there") from None
    return _parse_manifest(raw, url, "rebuild the set with irra-build-shards and upload the whole folder")


def load_manifest(shards_dir: str | os.PathLike, verify: VerifyMode = True, *,
                  store: ShardStore | None = None) -> dict[str, Any]:
    """Read ``manifest.json`` and check the shard files against it, before any training starts.

    Args:
        shards_dir: the folder written by :func:`build_shards`, or an ``http(s)://``/``pipe:`` location
            (:mod:`irra_dist.data.sources`); remote files are verified when fetched, so `verify` only
            concerns local sets.
        verify: ``"size"`` (or True): every listed file exists with its recorded byte size;
            ``"full"``: also its SHA-256 (slow for big sets; a passing result is cached in
            ``.verified.json`` and reused while sizes and mtimes are unchanged); ``"none"`` (or False):
            existence only.
        store: the set's :class:`ShardStore` (built from `shards_dir` when None).

    Returns:
        The manifest dict.

    Raises:
        ShardError: no manifest (e.g. an interrupted build), an unreadable or incompatible one, or a
            missing or mismatching file; the message names the file and says to rebuild.
    """
    mode = _normalize_verify(verify)
    store = store if store is not None else ShardStore(shards_dir)
    if store.remote:
        return _load_remote_manifest(store)
    folder = Path(shards_dir)
    path = folder / MANIFEST_NAME
    hint = _REBUILD_HINT.format(out=folder)
    if not path.is_file():
        why = "no such folder" if not folder.is_dir() else "an interrupted or missing build"
        raise ShardError(f"no {MANIFEST_NAME} in {folder} ({why}): build the shards with irra-build-shards "
                         f"--dataset NAME --root DIR --out {folder}")
    raw = path.read_bytes()
    manifest = _parse_manifest(raw, str(path), hint)
    checked: list[tuple[Path, os.stat_result]] = []
    for entry in _listed_files(manifest):
        file = folder / entry["file"]
        try:
            st = file.stat()
        except FileNotFoundError:
            raise ShardError(f"{file} is missing (listed in {MANIFEST_NAME}): {hint}") from None
        if mode != "none" and st.st_size != entry["bytes"]:
            raise ShardError(f"{file} has {st.st_size} bytes but {MANIFEST_NAME} records {entry['bytes']} "
                             f"(truncated or replaced): {hint}")
        checked.append((file, st))
    if mode == "full":
        stamp_path = folder / _VERIFIED_STAMP
        stamp = _stamp_for(raw, checked)
        try:
            cached = json.loads(stamp_path.read_bytes()) == stamp
        except (OSError, ValueError):
            cached = False
        if not cached:
            for entry, (file, _) in zip(_listed_files(manifest), checked):
                if file_sha256(file) != entry["sha256"]:
                    raise ShardError(f"{file} does not match the SHA-256 in {MANIFEST_NAME} (corrupted or "
                                     f"replaced): {hint}")
            try:
                _atomic_write_bytes(stamp_path, _json_bytes(stamp))
            except OSError:
                logger.debug("cannot write %s (read-only shard folder?); full verification not cached",
                             stamp_path)
    return manifest


@dataclass
class SplitIndex:
    """Which shard holds each record of one split, plus its pid, image id and caption count.

    All columns are int64 arrays of one entry per record (image), in shard order; a record's position in
    the split is its index in the split's wids dataset.
    """

    shards_dir: Path | str
    split: str
    shard_files: list[str]
    shard: np.ndarray
    pid: np.ndarray
    image_id: np.ndarray
    num_captions: np.ndarray
    shard_entries: list[dict[str, Any]] = field(default_factory=list)
    """The manifest's entries of the shards (file, bytes, sha256, num_records), in order."""
    store: ShardStore | None = None

    def __len__(self) -> int:
        return len(self.pid)

    @classmethod
    def load(cls, shards_dir: str | os.PathLike, manifest: dict[str, Any], split: str, *,
             store: ShardStore | None = None) -> SplitIndex:
        """Read one split's index file and check it against the manifest's per-shard record counts.

        Raises:
            ShardError: the split is not in the manifest, or the index disagrees with it.
        """
        store = store if store is not None else ShardStore(shards_dir)
        location = shards_dir if store.remote else Path(shards_dir)
        hint = _REBUILD_HINT.format(out=location)
        if split not in manifest["splits"]:
            raise ShardError(f"split {split!r} is not in {store.url(MANIFEST_NAME)} (has "
                             f"{', '.join(manifest['splits'])}): choose one of those or {hint}")
        entry = manifest["splits"][split]
        where = store.url(entry["index"]["file"])
        try:
            raw = store.read_bytes(entry["index"]["file"])
            if store.remote and hashlib.sha256(raw).hexdigest() != entry["index"]["sha256"]:
                raise ValueError("hash mismatch")
            data = json.loads(raw)
            columns = {name: np.asarray(data[name], dtype=np.int64) for name in _INDEX_COLUMNS}
            shard_files = list(data["shards"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ShardError(f"{where} is unreadable ({err}): {hint}") from None
        listed = [s["file"] for s in entry["shards"]]
        counts = np.bincount(columns["shard"], minlength=len(listed)) if len(columns["shard"]) else np.zeros(
            len(listed), dtype=np.int64)
        expected = [s["num_records"] for s in entry["shards"]]
        lengths = {len(c) for c in columns.values()}
        if shard_files != listed or lengths != {entry["num_images"]} or counts.tolist() != expected:
            raise ShardError(f"{where} does not match the record counts in {MANIFEST_NAME}: {hint}")
        return cls(location, split, shard_files, **columns, shard_entries=list(entry["shards"]), store=store)


def _wids() -> Any:
    """The wids package, imported on first use: it imports torch, which the torch-free serving path (ONNX
    queries over a shard gallery, :func:`read_record_members`) must not load."""
    import wids

    return wids


@functools.cache
def _store_shards_type() -> type:
    """wids' LRU of open, indexed shards, opening each through the :class:`ShardStore` (the local file, or a
    fetched, verified, cached copy) instead of wids' downloader (see :mod:`irra_dist.data.sources`)."""
    wids = _wids()

    class StoreShards(wids.wids.LRUShards):
        def __init__(self, lru_size: int, shard_path: Callable[[str], Path]) -> None:
            super().__init__(lru_size, localname=shard_path)
            self._shard_path = shard_path

        def get_shard(self, url: str) -> Any:
            self.accesses += 1
            if url not in self.lru:
                path = self._shard_path(url)
                try:
                    self.lru[url] = wids.wids.IndexedTarSamples(path=str(path))
                except (struct.error, ValueError, UnicodeDecodeError) as err:  # a cut or garbled tar header
                    raise RecordError(f"{url} cannot be indexed as a tar file ({err})") from None
                self.misses += 1
            return self.lru[url]

    return StoreShards


def read_record_members(index: SplitIndex, record: int) -> dict[str, bytes]:
    """The members of one record of a LOCAL shard set as ``{extension: bytes}``, with the standard library's
    tarfile instead of wids, so that no torch is imported (wids imports it). For reading a handful of
    records (a search result's images); loaders use :class:`RecordReader`.

    Raises:
        RecordError: the shard ends before the record, or is not a tar file.
        OSError: the shard cannot be opened.
    """
    shard = int(index.shard[record])
    position = record - int(np.searchsorted(index.shard, shard))  # records are in shard order
    path = Path(index.shards_dir) / index.shard_files[shard]
    members: dict[str, bytes] = {}
    key, seen = None, -1
    try:
        with tarfile.open(path) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name = info.name.rsplit("/", 1)[-1]
                stem, _, ext = name.partition(".")
                if stem != key:  # a new sample starts (webdataset groups members by key prefix)
                    if seen == position:
                        break
                    key, seen = stem, seen + 1
                if seen == position:
                    members[ext] = tar.extractfile(info).read()
    except tarfile.TarError as err:
        raise RecordError(f"{path} cannot be read as a tar file ({err})") from None
    if not members:
        raise RecordError(f"{path} ends before record {record} of the {index.split} split")
    return members


class RecordReader:
    """Reads records (image + json members) of one split by position, through ``wids.ShardListDataset``.

    The wids dataset (its open, memory-mapped shards) is made lazily in the process that reads, so each
    DataLoader worker has its own; it is not pickled.
    """

    def __init__(self, index: SplitIndex, open_shards: int = OPEN_SHARDS) -> None:
        self.index = index
        self.open_shards = max(1, min(open_shards, len(index.shard_files)))
        self._entries = {e["file"]: e for e in index.shard_entries}
        self._wids: Any = None  # a wids.ShardListDataset, made in the process that reads
        self._owner = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_wids": None, "_owner": -1}

    def _shard_path(self, name: str) -> Path:
        entry = self._entries.get(name)
        store = self.index.store or ShardStore(self.index.shards_dir)
        if entry is None:  # an index without manifest entries (tests build some by hand)
            return store.local_path(name)
        return store.shard_path(name, int(entry["bytes"]), str(entry["sha256"]))

    def _dataset(self) -> Any:
        if self._wids is None or self._owner != os.getpid():
            counts = np.bincount(self.index.shard, minlength=len(self.index.shard_files)).tolist()
            shardlist = [{"url": name, "nsamples": n} for name, n in zip(self.index.shard_files, counts)]
            with contextlib.redirect_stderr(io.StringIO()):  # wids prints a summary line per dataset
                dataset = _wids().ShardListDataset(shardlist, transformations=[], lru_size=self.open_shards,
                                                localname=str)
            dataset.cache = _store_shards_type()(self.open_shards, self._shard_path)
            self._wids, self._owner = dataset, os.getpid()
        return self._wids

    def sample(self, record: int) -> dict[str, bytes]:
        """The members of record `record` as ``{extension: bytes}`` (e.g. ``{"jpg": ..., "json": ...}``).

        Raises:
            RecordError: the shard is cut short or garbled where the record lies.
            ShardError: a remote shard cannot be fetched or fails verification.
            OSError: the shard cannot be opened or read.
        """
        try:
            raw = self._dataset()[int(record)]
        except (AssertionError, IndexError, struct.error, UnicodeDecodeError) as err:
            raise RecordError(f"record {record} of the {self.index.split} split cannot be read ({err})",
                              ) from None
        return {k.lstrip("."): v.getvalue() for k, v in raw.items() if not k.startswith("__")}

    def read(self, record: int) -> tuple[bytes, bytes]:
        """Return ``(image bytes, json bytes)`` of record `record`.

        Raises:
            KeyError: the record has no json or no image member.
            RecordError, ShardError, OSError: see :meth:`sample`.
        """
        members = self.sample(record)
        meta = members.pop("json")
        if len(members) != 1:
            raise KeyError(f"record {record} has {len(members)} image members ({', '.join(members)}), "
                           "not one")
        return next(iter(members.values())), meta

    def read_json(self, record: int) -> dict[str, Any]:
        """Return the decoded json member of record `record` (its captions, pid, ...)."""
        return json.loads(self.sample(record)["json"])

    def close(self) -> None:
        if self._wids is not None:
            self._wids.close()
            self._wids = None
