"""WebDataset tar shards of a parsed dataset, the manifest that describes them, and random access into them.

Layout of a shard folder (``irra-build-shards --out DIR``)::

    DIR/manifest.json            written last: its presence marks a complete set
    DIR/train-000000.tar ...     one tar member group per IMAGE: <key>.<ext> (image) + <key>.json
    DIR/train-index.json         per record: shard, byte offsets and sizes of both members, pid, image_id,
                                 number of captions (so loaders read members by offset, never scan tars)
    DIR/test-*, DIR/val-*        the same for the evaluation splits

A record's json member holds ``pid``, ``image_id``, ``rel_path`` and ``captions``. Keys are the record's
position in its split (``%08d``), so the shards are plain WebDataset tars that any tar-based reader can use.
Images are the original file bytes, or with ``pre_resize`` the image converted to RGB and resized to the
training size with bilinear (as the official Resize), stored losslessly as PNG or raw PPM; resizing such an
image to the same size again is the identity, so training pixels are the same either way.

Builds are deterministic (fixed member order, mtime 0, uid/gid 0, no user names, USTAR headers, no
timestamps in the manifest): the same input gives byte-identical files. Every file is written under a
temporary name and renamed when complete; an existing manifest is removed before anything else is written
and the new one is written last, so an interrupted build never leaves a set that looks complete.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import logging
import os
import re
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from irra_dist.data.parsers import (
    SPLITS,
    DatasetError,
    DatasetNotFoundError,
    ImageRecord,
    ParsedDataset,
    carve_val_identities,
    parse_dataset,
)

logger = logging.getLogger(__name__)

FORMAT_NAME = "irra_dist.shards"
BUILDER_VERSION = 1
"""Bumped whenever the shard layout changes; loaders refuse sets built by a newer builder."""
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
_INDEX_RE = re.compile(r"^(train|val|test)-index\.json$")
_TMP_RE = re.compile(r"^\..+\.tmp$")
_VERIFIED_STAMP = ".verified.json"
_BLOCK = 512
_INDEX_COLUMNS = ("shard", "image_offset", "image_size", "json_offset", "json_size", "pid", "image_id",
                  "num_captions")

VerifyMode = bool | Literal["none", "size", "full"]


class ShardError(ValueError):
    """A shard set that cannot be used or written; one line naming the file and the fix."""


class RecordError(OSError):
    """One record cannot be read (its bytes are cut short); the loader skips it and counts it."""


# --------------------------------------------------------------------------------------------------
# Writing


def _tar_member(name: str, data: bytes) -> bytes:
    """One tar member (header, data, padding) with fixed metadata, so rebuilds are byte-identical."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    return header + data + b"\0" * (-len(data) % _BLOCK)


class _HashingWriter:
    """Write to a temporary file while hashing and counting, then rename into place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        self._file = open(self.tmp, "wb")  # noqa: SIM115 -- closed in commit()/abort()
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)
        self.size += len(data)

    def commit(self) -> dict[str, Any]:
        self._file.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "bytes": self.size, "sha256": self._sha.hexdigest()}

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


def _atomic_write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    writer = _HashingWriter(path)
    try:
        writer.write(data)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def _json_bytes(obj: Any, indent: int | None = None) -> bytes:
    separators = (",", ": ") if indent else (",", ":")
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=indent, separators=separators).encode()


def _parse_size(pre_resize: tuple[int, int] | str | None) -> tuple[int, int] | None:
    if pre_resize is None or isinstance(pre_resize, tuple | list):
        size = pre_resize
    else:
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(pre_resize))
        size = (int(match.group(1)), int(match.group(2))) if match else None
        if size is None:
            raise ShardError(f"cannot read pre_resize {pre_resize!r}: write it as HxW, e.g. 384x128")
    if size is not None and (len(size) != 2 or min(size) <= 0):
        raise ShardError(f"pre_resize must be two positive integers (height, width), got {size!r}")
    return None if size is None else (int(size[0]), int(size[1]))


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
                 skip_bad: bool = False, progress: bool = True) -> dict[str, Any]:
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
        progress: show a tqdm progress bar.

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
    with executor(max_workers=workers) as pool, \
            tqdm(total=total, desc=f"shards {parsed.name}", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            splits[split] = _write_split(out, split, parsed.splits[split], pool, size, fmt, shard_size,
                                         workers, skip_bad, build_skipped, bar)
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
        "num_skipped": parsed.num_skipped + len(build_skipped),
        # Set when the val split was carved from the training identities (irra-build-shards --val-ids N).
        "val_from_train": parsed.val_from_train,
        "splits": splits,
    }
    _atomic_write_bytes(out / MANIFEST_NAME, _json_bytes(manifest, indent=1) + b"\n")
    listed = {MANIFEST_NAME} | {s["index"]["file"] for s in splits.values()} | {
        shard["file"] for s in splits.values() for shard in s["shards"]}
    for stale in _our_files(out):
        if stale.name not in listed:
            stale.unlink()
    # The dataset table was logged when the annotations were parsed; not twice.
    logger.info("%s shards complete in %s", parsed.name, out)
    return manifest


def _write_split(out: Path, split: str, records: list[ImageRecord], pool: Executor,
                 size: tuple[int, int] | None, fmt: str, shard_size: int, workers: int, skip_bad: bool,
                 build_skipped: list[str], bar: tqdm) -> dict[str, Any]:
    """Write one split's shards and index file; return its manifest entry."""
    columns: dict[str, list[int]] = {name: [] for name in _INDEX_COLUMNS}
    shards: list[dict[str, Any]] = []
    writer: _HashingWriter | None = None
    in_shard = 0

    def close_shard() -> None:
        nonlocal writer
        assert writer is not None
        entry = writer.commit()
        entry["num_records"] = in_shard
        shards.append(entry)
        writer = None

    pids: set[int] = set()
    num_captions = 0
    try:
        futures = _ordered_map(pool, _encode_image, ((r.path, size, fmt) for r in records),
                               window=8 * workers)
        for record, future in zip(records, futures):
            bar.update(1)
            try:
                image, ext = future.result()
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                reason = f"{split} image {record.path} ({record.rel_path}) cannot be read: {err}"
                if not skip_bad:
                    raise ShardError(f"{reason}: restore the file, or pass --skip-bad to skip it") from None
                build_skipped.append(reason)
                continue
            if writer is None:
                writer = _HashingWriter(out / f"{split}-{len(shards):06d}.tar")
                in_shard = 0
            key = f"{len(columns['pid']):08d}"
            meta = _json_bytes({"pid": record.pid, "image_id": record.image_id, "rel_path": record.rel_path,
                                "captions": list(record.captions)})
            columns["shard"].append(len(shards))
            columns["image_offset"].append(writer.size + _BLOCK)
            columns["image_size"].append(len(image))
            writer.write(_tar_member(f"{key}.{ext}", image))
            columns["json_offset"].append(writer.size + _BLOCK)
            columns["json_size"].append(len(meta))
            writer.write(_tar_member(f"{key}.json", meta))
            columns["pid"].append(record.pid)
            columns["image_id"].append(record.image_id)
            columns["num_captions"].append(len(record.captions))
            pids.add(record.pid)
            num_captions += len(record.captions)
            in_shard += 1
            if in_shard == shard_size:
                writer.write(b"\0" * (2 * _BLOCK))  # tar end-of-archive marker
                close_shard()
        if writer is not None:
            writer.write(b"\0" * (2 * _BLOCK))
            close_shard()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise

    index = {"split": split, "shards": [s["file"] for s in shards], **columns}
    index_entry = _atomic_write_bytes(out / f"{split}-index.json", _json_bytes(index))
    return {"num_ids": len(pids), "num_images": len(columns["pid"]), "num_captions": num_captions,
            "num_samples": num_captions, "index": index_entry, "shards": shards}


# --------------------------------------------------------------------------------------------------
# Loading and verifying


def _normalize_verify(verify: VerifyMode) -> str:
    mode = {True: "size", False: "none"}.get(verify, verify) if isinstance(verify, bool) else verify
    if mode not in ("none", "size", "full"):
        raise ValueError(f"verify must be True, False, 'none', 'size' or 'full', got {verify!r}")
    return mode


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def _listed_files(manifest: dict[str, Any]) -> Iterable[dict[str, Any]]:
    for split in manifest["splits"].values():
        yield split["index"]
        yield from split["shards"]


def _stamp_for(manifest_bytes: bytes, files: list[tuple[Path, os.stat_result]]) -> dict[str, Any]:
    return {"manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "files": {p.name: [st.st_size, st.st_mtime_ns] for p, st in files}}


def load_manifest(shards_dir: str | os.PathLike, verify: VerifyMode = True) -> dict[str, Any]:
    """Read ``manifest.json`` and check the shard files against it, before any training starts.

    Args:
        shards_dir: the folder written by :func:`build_shards`.
        verify: ``"size"`` (or True): every listed file exists with its recorded byte size;
            ``"full"``: also its SHA-256 (slow for big sets; a passing result is cached in
            ``.verified.json`` and reused while sizes and mtimes are unchanged); ``"none"`` (or False):
            existence only.

    Returns:
        The manifest dict.

    Raises:
        ShardError: no manifest (e.g. an interrupted build), an unreadable or incompatible one, or a
            missing or mismatching file; the message names the file and says to rebuild.
    """
    mode = _normalize_verify(verify)
    folder = Path(shards_dir)
    path = folder / MANIFEST_NAME
    hint = _REBUILD_HINT.format(out=folder)
    if not path.is_file():
        why = "no such folder" if not folder.is_dir() else "an interrupted or missing build"
        raise ShardError(f"no {MANIFEST_NAME} in {folder} ({why}): build the shards with irra-build-shards "
                         f"--dataset NAME --root DIR --out {folder}")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
        ok = manifest.get("format") == FORMAT_NAME and isinstance(manifest.get("splits"), dict)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise ShardError(f"{path} is not an irra_dist shard manifest: {hint}")
    if manifest.get("builder_version", 0) > BUILDER_VERSION:
        raise ShardError(f"{path} was written by a newer shard builder (version "
                         f"{manifest['builder_version']} > {BUILDER_VERSION}): update irra_dist or {hint}")
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
                if _sha256_file(file) != entry["sha256"]:
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
    """Where each record of one split lives in the shards, plus its pid, image id and caption count.

    All columns are int64 arrays of one entry per record (image), in shard order.
    """

    shards_dir: Path
    split: str
    shard_files: list[str]
    shard: np.ndarray
    image_offset: np.ndarray
    image_size: np.ndarray
    json_offset: np.ndarray
    json_size: np.ndarray
    pid: np.ndarray
    image_id: np.ndarray
    num_captions: np.ndarray

    def __len__(self) -> int:
        return len(self.pid)

    @classmethod
    def load(cls, shards_dir: str | os.PathLike, manifest: dict[str, Any], split: str) -> SplitIndex:
        """Read one split's index file and check it against the manifest's per-shard record counts.

        Raises:
            ShardError: the split is not in the manifest, or the index disagrees with it.
        """
        folder = Path(shards_dir)
        hint = _REBUILD_HINT.format(out=folder)
        if split not in manifest["splits"]:
            raise ShardError(f"split {split!r} is not in {folder / MANIFEST_NAME} (has "
                             f"{', '.join(manifest['splits'])}): choose one of those or {hint}")
        entry = manifest["splits"][split]
        path = folder / entry["index"]["file"]
        try:
            data = json.loads(path.read_bytes())
            columns = {name: np.asarray(data[name], dtype=np.int64) for name in _INDEX_COLUMNS}
            shard_files = list(data["shards"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ShardError(f"{path} is unreadable: {hint}") from None
        listed = [s["file"] for s in entry["shards"]]
        counts = np.bincount(columns["shard"], minlength=len(listed)) if len(columns["shard"]) else np.zeros(
            len(listed), dtype=np.int64)
        expected = [s["num_records"] for s in entry["shards"]]
        lengths = {len(c) for c in columns.values()}
        if shard_files != listed or lengths != {entry["num_images"]} or counts.tolist() != expected:
            raise ShardError(f"{path} does not match the record counts in {MANIFEST_NAME}: {hint}")
        return cls(folder, split, shard_files, **columns)


class RecordReader:
    """Reads one record's members by byte offset (one ``pread``), keeping one open file per shard.

    File handles are opened lazily in the process that reads, so each DataLoader worker has its own; they
    are not pickled.
    """

    def __init__(self, index: SplitIndex) -> None:
        self.index = index
        self._fds: dict[int, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"index": self.index, "_fds": {}}

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(self.index.shards_dir / self.index.shard_files[shard], os.O_RDONLY)
            self._fds[shard] = fd
        return fd

    def _pread(self, shard: int, offset: int, size: int, record: int) -> bytes:
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise RecordError(f"record {record} of {self.index.shard_files[shard]} is cut short "
                              f"({len(data)} of {size} bytes; truncated shard)")
        return data

    def read(self, record: int) -> tuple[bytes, bytes]:
        """Return ``(image bytes, json bytes)`` of record `record`.

        Raises:
            RecordError: the shard ends before the record does.
            OSError: the shard cannot be opened or read.
        """
        ix = self.index
        img_off, img_len = int(ix.image_offset[record]), int(ix.image_size[record])
        js_off, js_len = int(ix.json_offset[record]), int(ix.json_size[record])
        start, end = min(img_off, js_off), max(img_off + img_len, js_off + js_len)
        span = self._pread(int(ix.shard[record]), start, end - start, record)
        return (span[img_off - start:img_off - start + img_len], span[js_off - start:js_off - start + js_len])

    def read_json(self, record: int) -> dict[str, Any]:
        """Return the decoded json member of record `record` (its captions, pid, ...)."""
        ix = self.index
        data = self._pread(int(ix.shard[record]), int(ix.json_offset[record]), int(ix.json_size[record]),
                           record)
        return json.loads(data)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()



# --------------------------------------------------------------------------------------------------
# Command line


def _arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irra-build-shards",
        description="Write a person-retrieval dataset as WebDataset tar shards plus manifest.json.")
    parser.add_argument("--dataset", required=True, help="CUHK-PEDES, ICFG-PEDES or RSTPReid (or an alias)")
    parser.add_argument("--root", required=True, help="the dataset folder, or the data root holding it")
    parser.add_argument("--out", default=None, help="destination folder (default: shards/<dataset>)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads reading images (processes when pre-resizing)")
    parser.add_argument("--pre-resize", default=None, metavar="HxW",
                        help="store images resized to HxW (bilinear, lossless), e.g. 384x128")
    parser.add_argument("--pre-resize-format", choices=PRE_RESIZE_FORMATS, default="png",
                        help="format of pre-resized images: png (compact) or ppm (raw RGB, fastest to load)")
    parser.add_argument("--val-ids", type=int, default=0, metavar="N",
                        help="move N whole training identities into a val split, deterministically (for "
                             "datasets without one: ICFG-PEDES; configs/irra_icfg_pedes.yaml uses 300); "
                             "default 0: the official splits")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad records instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="replace another dataset's shards in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``irra-build-shards``: parse argv, build the shards, print the dataset table and a summary.

    Returns:
        0 on success, 2 on bad input (one ``error:`` line on stderr).
    """
    args = _arg_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        parsed = carve_val_identities(parse_dataset(args.dataset, args.root, skip_bad=args.skip_bad),
                                      args.val_ids)
        out = Path(args.out) if args.out else Path("shards") / parsed.name
        print(parsed.table())
        manifest = build_shards(parsed, None, out, shard_size=args.shard_size, workers=args.workers,
                                pre_resize=args.pre_resize, pre_resize_format=args.pre_resize_format,
                                overwrite=args.overwrite, skip_bad=args.skip_bad,
                                progress=not args.no_progress)
    except (ShardError, DatasetError, DatasetNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, entry in manifest["splits"].items():
        size = sum(s["bytes"] for s in entry["shards"])
        print(f"{split}: {len(entry['shards'])} shards, {entry['num_images']} images, "
              f"{entry['num_captions']} captions, {size / 2**20:.1f} MiB")
    print(f"wrote {out / MANIFEST_NAME} ({manifest['num_train_ids']} train ids, "
          f"{manifest['num_skipped']} skipped)")
    return 0
