"""Users' own data: a JSON-lines annotation file over a folder of images, parsed into a ParsedDataset.

One JSON object per line::

    {"image": "cam1/0001.jpg", "captions": ["a woman in a red coat", "..."], "pid": "anna", "split": "train"}

- ``image``: a path relative to the images folder; it may not leave that folder.
- ``captions``: a list of strings or one string; at least one non-empty caption.
- ``pid`` (optional): any integer or string naming the identity. Train pids are remapped to 0..N-1 in order
  of first appearance (the official parsers' contiguous train ids); val/test pids are remapped the same way
  within their split (only equality matters there). Without ``pid`` on every line, each image is its own
  identity, and the manifest says so (``identities: "per_image"``) so that the trainer can turn the ID loss
  off: a classifier over one-image classes only memorises.
- ``split`` (optional): ``train``, ``val`` or ``test``. Lines without it are train, from which
  ``val_ids``/``test_ids`` whole identities can be carved deterministically.

Unlike the official formats (whose quirks the other parsers keep), this format is ours, so it is strict:
every problem is reported as ``<file>:<line>: <problem>: <fix>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from irra_dist.data.parsers import (
    SPLITS,
    DatasetError,
    DatasetNotFoundError,
    ImageRecord,
    ParsedDataset,
    carve_identities,
)

logger = logging.getLogger(__name__)

JSONL_NAME = "jsonl"
"""The dataset name recorded in the manifest of a JSON-lines set."""
_SKIP_HINT = "fix the line, or pass --skip-bad to skip bad lines"
JSONL_CARVE_RULE = ("the num_ids identities without a split whose key ('pid <pid>', or 'line <n>' without "
                    "pids) "
                    "has the smallest sha256('irra_dist-<split>:<key>'); test carved first")


def _check_line(obj: Any, images_dir: Path, images_real: str, check_images: bool
                ) -> tuple[str, str, tuple[str, ...], Any, str | None]:
    """Validate one decoded line; return ``(rel_path, abs_path, captions, pid or None, split or None)``.

    Raises:
        ValueError: the line's problem, as a short phrase with its fix.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"is a JSON {type(obj).__name__}, not an object: write one object per line")
    rel = obj.get("image")
    if not isinstance(rel, str) or not rel.strip():
        raise ValueError("has no 'image' path: add \"image\": \"<path relative to the images folder>\"")
    if os.path.isabs(rel):
        raise ValueError(f"'image' {rel!r} is absolute: write it relative to the images folder")
    abs_path = images_dir / rel
    # realpath resolves both '..' and symbolic links, so neither can reach outside the images folder.
    if os.path.commonpath([images_real, os.path.realpath(abs_path)]) != images_real:
        raise ValueError(f"'image' {rel!r} leaves the images folder {images_dir}: keep images inside it")
    captions = obj.get("captions")
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError("'captions' must be a list of strings or one string")
    captions = tuple(c for c in captions if c.strip())
    if not captions:
        raise ValueError("has no captions: give at least one non-empty caption")
    pid = obj.get("pid")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int | str) or pid == ""):
        raise ValueError(f"'pid' {pid!r} must be an integer or a non-empty string")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise ValueError(f"'split' {split!r} must be one of {', '.join(SPLITS)} (or left out: train)")
    if check_images:
        try:
            with Image.open(abs_path) as img:
                img.verify()  # header and structure, without decoding every pixel
        except FileNotFoundError:
            raise ValueError(f"image {abs_path} does not exist") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"image {abs_path} cannot be read ({type(err).__name__}: {err})") from None
    return rel, str(abs_path), captions, pid, split


def parse_jsonl(ann: str | os.PathLike, images: str | os.PathLike, *, skip_bad: bool = False,
                check_images: bool = True, val_ids: int = 0, test_ids: int = 0) -> ParsedDataset:
    """Parse a JSON-lines annotation file (module docstring) into a :class:`ParsedDataset`.

    Args:
        ann: the ``.jsonl`` file.
        images: the folder that the ``image`` paths are relative to.
        skip_bad: skip bad lines (counted in ``num_skipped``) instead of raising on the first one.
        check_images: open each image's header (a missing, non-image or damaged file is a bad line).
        val_ids, test_ids: whole train identities (lines without ``split``) to move to val / test.

    Raises:
        DatasetNotFoundError: the annotation file or the images folder does not exist.
        DatasetError: a bad line (without `skip_bad`), or more identities to carve than there are.
    """
    ann_path = Path(ann).expanduser().absolute()
    images_dir = Path(images).expanduser().absolute()
    if not ann_path.is_file():
        raise DatasetNotFoundError(f"annotation file {ann_path} not found: pass --ann PATH/TO/data.jsonl")
    if not images_dir.is_dir():
        raise DatasetNotFoundError(f"images folder {images_dir} not found: pass --images DIR (the folder "
                                   "that the 'image' paths are relative to)")
    if val_ids < 0 or test_ids < 0:
        raise DatasetError("--val-ids and --test-ids must be >= 0")
    raw = ann_path.read_bytes()
    images_real = os.path.realpath(images_dir)
    rows: list[tuple[int, str, str, tuple[str, ...], Any, str | None]] = []
    skipped: list[str] = []
    for line_no, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            try:
                obj = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"is not valid JSON ({err})") from None
            rows.append((line_no, *_check_line(obj, images_dir, images_real, check_images)))
        except ValueError as err:
            reason = f"{ann_path}:{line_no}: {err}"
            if not skip_bad:
                raise DatasetError(f"{reason}; {_SKIP_HINT}") from None
            skipped.append(reason)
    if not rows:
        raise DatasetError(f"{ann_path} holds no usable line: write one JSON object per image")

    has_pids = all(pid is not None for _, _, _, _, pid, _ in rows)
    if not has_pids and any(pid is not None for _, _, _, _, pid, _ in rows):
        raise DatasetError(f"{ann_path}: 'pid' is on some lines but not on others: give every line a pid, "
                           "or none (then every image is its own identity)")
    # Identity keys: the given pid as text (1 and "1" name one identity), else the line itself.
    keys = [f"pid {pid}" if has_pids else f"line {line_no}" for line_no, _, _, _, pid, _ in rows]
    splits_of = [split or "train" for *_, split in rows]
    # Only identities none of whose lines name a split are carved, so no identity ends up in two splits.
    named = {k for k, row in zip(keys, rows) if row[5] is not None}
    free_train = [k for k in dict.fromkeys(keys) if k not in named]
    carved: dict[Any, str] = {}
    for split, count in (("test", test_ids), ("val", val_ids)):
        if count:
            chosen = carve_identities([k for k in free_train if k not in carved], count, split)
            carved.update(dict.fromkeys(chosen, split))
    splits_of = [carved.get(k, s) for k, s in zip(keys, splits_of)]

    splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    pid_maps: dict[str, dict[Any, int]] = {s: {} for s in SPLITS}
    for (_, rel, abs_path, captions, _, _), key, split in zip(rows, keys, splits_of):
        pid = pid_maps[split].setdefault(key, len(pid_maps[split]))
        records = splits[split]
        records.append(ImageRecord(len(records), pid, rel, abs_path, captions))
    if skipped:
        logger.warning("%s: skipped %d bad line(s); first: %s", ann_path.name, len(skipped), skipped[0])
    carved_val = sorted(k for k, split in carved.items() if split == "val")
    val_from_train = {"num_ids": val_ids, "rule": JSONL_CARVE_RULE, "ids": carved_val} if val_ids else None
    dataset = ParsedDataset(JSONL_NAME, str(images_dir), str(ann_path), hashlib.sha256(raw).hexdigest(),
                            splits, len(skipped), skipped, identities="given" if has_pids else "per_image",
                            val_from_train=val_from_train)
    logger.info("%s loaded from %s\n%s", JSONL_NAME, ann_path, dataset.table())
    return dataset
