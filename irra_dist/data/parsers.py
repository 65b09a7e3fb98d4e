"""Annotation parsers for CUHK-PEDES, ICFG-PEDES and RSTPReid, as the official IRRA code reads them.

The three official parsers (datasets/cuhkpedes.py, icfgpedes.py, rstpreid.py; IRRA_SPEC 3.1) share one
logic, reproduced here:

- the split field maps ``'train'`` to train, ``'test'`` to test and any other value to val;
- one :class:`ImageRecord` per annotation entry, with an ``image_id`` counted from 0 per split in
  annotation order;
- the train pid is ``id - 1`` on CUHK-PEDES and ``id`` elsewhere; val/test pids are ``id`` unshifted;
- the train pids must enumerate as 0..N-1 (the official ``assert idx == pid``);
- training samples are one per caption; the gallery holds each evaluation image once and every caption
  of every evaluation image is a query;
- an empty caption list is valid: such a train image gives no sample but its pid still counts in the
  number of classes, and such an evaluation image stays in the gallery (a distractor) and gives no query.

Unlike the official code, bad entries (a missing field, a wrong type, a missing image file) are reported
with the entry's index and path instead of crashing deep inside a data loader, and can be skipped on
request; each skip is counted and its reason kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_TABLE_ORDER = ("train", "test", "val")  # the official show_dataset_info row order
_SKIP_HINT = "fix the annotation file, or pass --skip-bad (skip_bad=True) to skip bad records"


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message is one line naming the problem and the fix."""


class DatasetNotFoundError(FileNotFoundError):
    """The dataset folder or its annotation file does not exist; the message lists the paths tried."""


@dataclass(frozen=True)
class DatasetSpec:
    """How one benchmark is laid out on disk and how its ids map to pids."""

    name: str
    """Canonical name, also the folder name under the data root."""
    annotation_files: tuple[str, ...]
    """Annotation file names tried in order inside the dataset folder."""
    path_key: str
    """The annotation field holding the image path relative to imgs/."""
    train_pid_offset: int
    """Subtracted from the id of train images (CUHK-PEDES ids are 1-based)."""


DATASET_SPECS: dict[str, DatasetSpec] = {
    "CUHK-PEDES": DatasetSpec("CUHK-PEDES", ("reid_raw.json",), "file_path", 1),
    # The official README spells the file ICFG_PEDES.json while the code opens ICFG-PEDES.json.
    "ICFG-PEDES": DatasetSpec("ICFG-PEDES", ("ICFG-PEDES.json", "ICFG_PEDES.json"), "file_path", 0),
    "RSTPReid": DatasetSpec("RSTPReid", ("data_captions.json",), "img_path", 0),
}

_ALIASES = {
    "cuhk": "CUHK-PEDES", "cuhk-pedes": "CUHK-PEDES", "cuhk_pedes": "CUHK-PEDES", "cuhkpedes": "CUHK-PEDES",
    "icfg": "ICFG-PEDES", "icfg-pedes": "ICFG-PEDES", "icfg_pedes": "ICFG-PEDES", "icfgpedes": "ICFG-PEDES",
    "rstp": "RSTPReid", "rstpreid": "RSTPReid", "rstp-reid": "RSTPReid", "rstp_reid": "RSTPReid",
}


def canonical_dataset_name(name: str) -> str:
    """Map a dataset name or alias (case-insensitive) to its canonical name.

    Args:
        name: e.g. ``"cuhk"``, ``"ICFG-PEDES"``, ``"rstpreid"``.

    Returns:
        One of ``"CUHK-PEDES"``, ``"ICFG-PEDES"``, ``"RSTPReid"``.

    Raises:
        DatasetError: the name is not known.
    """
    canonical = _ALIASES.get(str(name).strip().lower())
    if canonical is None:
        known = ", ".join(sorted(set(_ALIASES) | set(DATASET_SPECS)))
        raise DatasetError(f"unknown dataset name {name!r}: use one of {known}")
    return canonical


@dataclass(frozen=True)
class ImageRecord:
    """One annotated image: its identity, where it is, and its captions."""

    image_id: int
    """Running per-split counter from 0, in annotation order."""
    pid: int
    """Train: relabelled (CUHK id-1; ICFG/RSTP id); val/test: int(id) unshifted."""
    rel_path: str
    """The path as written in the annotation (file_path / img_path)."""
    path: str
    """Absolute path: <dataset dir>/imgs/<rel_path>."""
    captions: tuple[str, ...]
    """May be empty (the official code accepts it): the image then gives no training sample or query."""


@dataclass
class ParsedDataset:
    """A whole benchmark after parsing: image records per split plus where they came from."""

    name: str
    """Canonical name: "CUHK-PEDES", "ICFG-PEDES" or "RSTPReid"."""
    dataset_dir: str
    annotation_path: str
    annotation_sha256: str
    splits: dict[str, list[ImageRecord]]
    """"train", "val", "test" (always present; val is empty on ICFG-PEDES)."""
    num_skipped: int = 0
    """Bad records skipped because skip_bad was set."""
    skipped_reasons: list[str] = field(default_factory=list)
    skipped_train_pids: frozenset[int] = frozenset()
    """Train pids of records skipped only because their image file is missing; they remain classes."""
    identities: str = "given"
    """"given" (annotated pids) or "per_image" (no pids: each image is its own identity, so an ID
    classifier would only memorise images and the trainer turns the ID loss off)."""
    val_from_train: dict[str, Any] | None = None
    """Set by :func:`carve_val_identities`: how many training identities became the val split, and which."""

    def _records(self, split: str) -> list[ImageRecord]:
        if split not in self.splits:
            raise DatasetError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        return self.splits[split]

    @property
    def num_train_ids(self) -> int:
        """Number of training identities, i.e. the ID classifier's size (the official
        ``len(train_id_container)``: a train image without captions, or skipped for a missing file, still
        adds its pid)."""
        return len({r.pid for r in self.splits["train"]} | self.skipped_train_pids)

    def counts(self, split: str) -> tuple[int, int, int]:
        """Return ``(ids, images, captions)`` of one split, as the official dataset table counts them."""
        records = self._records(split)
        return len({r.pid for r in records}), len(records), sum(len(r.captions) for r in records)

    def table(self) -> str:
        """The official ``[subset, ids, images, captions]`` table (rows train, test, val) as text."""
        rows = [["subset", "ids", "images", "captions"]]
        rows += [[split, *map(str, self.counts(split))] for split in _TABLE_ORDER]
        widths = [max(len(row[c]) for row in rows) + 2 for c in range(4)]
        rule = "+" + "+".join("-" * w for w in widths) + "+"

        def line(row: list[str]) -> str:
            return "|" + "|".join(cell.center(w) for cell, w in zip(row, widths)) + "|"

        return "\n".join([rule, line(rows[0]), rule, *map(line, rows[1:]), rule])

    def train_samples(self) -> list[tuple[int, int, str, str]]:
        """One ``(pid, image_id, path, caption)`` per training caption, in annotation order."""
        return [(r.pid, r.image_id, r.path, c) for r in self.splits["train"] for c in r.captions]

    def gallery(self, split: str) -> tuple[list[int], list[str]]:
        """Return ``(pids, paths)`` with each image of an evaluation split once."""
        records = self._records(split)
        return [r.pid for r in records], [r.path for r in records]

    def queries(self, split: str) -> tuple[list[int], list[str]]:
        """Return ``(pids, captions)`` with every caption of every image of an evaluation split."""
        records = self._records(split)
        return [r.pid for r in records for _ in r.captions], [c for r in records for c in r.captions]


def find_annotation(name: str, root: str | os.PathLike) -> tuple[str, Path, Path]:
    """Locate a dataset's folder and annotation file.

    Args:
        name: dataset name or alias.
        root: the dataset folder itself (holding the annotation file and imgs/) or the data root holding
            ``CUHK-PEDES/``, ``ICFG-PEDES/``, ``RSTPReid/``.

    Returns:
        ``(canonical name, dataset folder, annotation file)``.

    Raises:
        DatasetNotFoundError: neither layout holds an annotation file; the message lists the paths tried.
    """
    canonical = canonical_dataset_name(name)
    spec = DATASET_SPECS[canonical]
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DatasetNotFoundError(f"{canonical} root {root} is not a folder: pass the {canonical} folder "
                                   f"or the data root holding {canonical}/")
    tried = []
    for folder in (root, root / spec.name):
        for file_name in spec.annotation_files:
            candidate = folder / file_name
            tried.append(str(candidate))
            if candidate.is_file():
                return canonical, folder, candidate
    raise DatasetNotFoundError(f"no {canonical} annotation file found (tried {', '.join(tried)}): pass the "
                               f"{canonical} folder or the data root holding {canonical}/")


def _int_like(value: Any) -> int | None:
    """``int(value)`` for the values the official ``int(anno['id'])`` reads sensibly, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


_Fields = tuple[str, int, str, str, tuple[str, ...]]


def _check_record(anno: Any, path_key: str, img_root: str, check_images: bool,
                  ) -> tuple[str | None, _Fields | None]:
    """Validate one entry: ``(None, fields)`` when good, ``(problem, None)`` when bad, and
    ``(problem, fields)`` when only its image file is missing (the fields are sound: its pid still counts)."""
    if not isinstance(anno, dict):
        return f"is a {type(anno).__name__}, not a mapping", None
    missing = [k for k in ("split", "id", path_key, "captions") if k not in anno]
    if missing:
        return f"misses field(s) {', '.join(repr(k) for k in missing)}", None
    split, raw_id, rel_path, captions = anno["split"], anno["id"], anno[path_key], anno["captions"]
    if not isinstance(split, str):
        return f"has 'split' {split!r}, not a string", None
    ident = _int_like(raw_id)
    if ident is None:
        return f"has 'id' {raw_id!r}, not an integer", None
    if not isinstance(rel_path, str) or not rel_path:
        return f"has {path_key!r} {rel_path!r}, not a non-empty string", None
    if os.path.isabs(rel_path):
        return f"has an absolute {path_key!r}; it must be relative to imgs/", None
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return "has 'captions' that is not a list of strings", None
    abs_path = os.path.join(img_root, rel_path)
    fields = (split, ident, rel_path, abs_path, tuple(captions))
    if check_images and not os.path.isfile(abs_path):
        return f"names image {abs_path}, which does not exist", fields
    return None, fields


def _check_train_pids(name: str, pids: set[int], offset: int) -> None:
    """The official ``assert idx == pid`` over the train pid set, as a readable error."""
    expected = set(range(len(pids)))
    if pids == expected:
        return
    missing = sorted(expected - pids)[:10]
    unexpected = sorted(pids - expected)[:10]
    shift = f" (pid = id - {offset})" if offset else ""
    raise DatasetError(
        f"{name} train pids{shift} must be 0..{len(pids) - 1} without gaps: missing {missing}, "
        f"out of range {unexpected} (first 10 shown); renumber the train ids so that they are contiguous")


def parse_dataset(name: str, root: str | os.PathLike, *, skip_bad: bool = False,
                  check_images: bool = True) -> ParsedDataset:
    """Parse a benchmark's annotation file exactly as the official IRRA code does (IRRA_SPEC 3.1).

    Args:
        name: ``"CUHK-PEDES"``, ``"ICFG-PEDES"``, ``"RSTPReid"`` (case-insensitive) or an alias
            (cuhk, icfg, rstp, ...).
        root: the dataset folder or the data root holding it (see :func:`find_annotation`).
        skip_bad: skip bad records (counted in ``num_skipped``) instead of raising on the first one.
        check_images: report records whose image file does not exist (a stat per image, no decoding).

    Returns:
        The parsed dataset.

    Raises:
        DatasetNotFoundError: the root, the annotation file or imgs/ is missing.
        DatasetError: the annotation is not a JSON list, a record is bad (without ``skip_bad``), or the
            train pids are not 0..N-1.
    """
    canonical, dataset_dir, annotation_path = find_annotation(name, root)
    spec = DATASET_SPECS[canonical]
    img_dir = dataset_dir / "imgs"
    if check_images and not img_dir.is_dir():
        raise DatasetNotFoundError(f"{canonical} image folder {img_dir} not found: put the images under "
                                   "imgs/ beside the annotation file, or pass check_images=False")
    raw = annotation_path.read_bytes()
    sha256 = hashlib.sha256(raw).hexdigest()
    try:
        annos = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{annotation_path} is not valid JSON ({err}): restore the original annotation "
                           "file") from None
    if not isinstance(annos, list):
        raise DatasetError(f"{annotation_path} must hold a JSON list of records, got "
                           f"{type(annos).__name__}: restore the original annotation file")

    splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    skipped: list[str] = []
    skipped_train_pids: set[int] = set()
    other_split_values: Counter[str] = Counter()
    img_root = str(img_dir)
    for index, anno in enumerate(annos):
        problem, fields = _check_record(anno, spec.path_key, img_root, check_images)
        if fields is not None:
            split_value, ident, rel_path, abs_path, captions = fields
            split = split_value if split_value in ("train", "test") else "val"
            pid = ident - spec.train_pid_offset if split == "train" else ident
        if problem is not None:
            where = anno.get(spec.path_key) if isinstance(anno, dict) else None
            reason = f"{canonical} record {index} (path {where!r}) in {annotation_path} {problem}"
            if not skip_bad:
                raise DatasetError(f"{reason}: {_SKIP_HINT}")
            skipped.append(reason)
            if fields is not None and split == "train":
                # Only the image is missing: the pid stays a class, as an image dropped while building does.
                skipped_train_pids.add(pid)
            continue
        if split_value not in SPLITS:
            other_split_values[split_value] += 1
        records = splits[split]
        records.append(ImageRecord(len(records), pid, rel_path, abs_path, captions))

    if other_split_values:
        logger.warning("%s: split values %s are not train/val/test; counted as val (the official rule)",
                       canonical, dict(other_split_values))
    if skipped:
        logger.warning("%s: skipped %d bad record(s); first: %s", canonical, len(skipped), skipped[0])
    _check_train_pids(canonical, {r.pid for r in splits["train"]} | skipped_train_pids, spec.train_pid_offset)
    dataset = ParsedDataset(canonical, str(dataset_dir), str(annotation_path), sha256, splits,
                            len(skipped), skipped, frozenset(skipped_train_pids))
    logger.info("%s loaded from %s\n%s", canonical, annotation_path, dataset.table())
    return dataset


VAL_CARVE_RULE = "the num_ids train ids with the smallest sha256('irra_dist-val:<id>')"


def carve_identities(keys: Iterable[Any], num_ids: int, split: str) -> set[Any]:
    """The `num_ids` distinct identities among `keys` with the smallest ``sha256("irra_dist-<split>:<key>")``.

    No RNG stream is involved: the choice is the same on every machine and library version, depends neither
    on the order of `keys` nor on which other identities are present, and growing a dataset keeps earlier
    choices where they still rank first.

    Raises:
        DatasetError: fewer identities than `num_ids`.
    """
    unique = sorted(set(keys), key=lambda k: hashlib.sha256(f"irra_dist-{split}:{k}".encode()).digest())
    if num_ids > len(unique):
        raise DatasetError(f"cannot carve {num_ids} {split} identities from {len(unique)} train identities: "
                           f"pass a smaller --{split}-ids")
    return set(unique[:num_ids])


def carve_val_identities(parsed: ParsedDataset, num_ids: int) -> ParsedDataset:
    """Move `num_ids` whole training identities, all their images and captions, into the val split.

    For a dataset without a val split (ICFG-PEDES), so that a model can be selected without the test split.
    The identities are the ones whose annotation id has the smallest SHA-256 of ``"irra_dist-val:<id>"``:
    spread over the id range, the same on every machine and library version (no RNG stream involved).
    The remaining train pids are renumbered 0..M-1 in their old order (the classifier's classes); the
    carved images keep their annotation id as pid, as val/test images do; image ids are recounted per split
    in annotation order.

    Args:
        parsed: the parsed dataset; returned unchanged when `num_ids` is 0.
        num_ids: identities to move.

    Returns:
        A new ParsedDataset, with ``val_from_train`` recording the count, the rule and the annotation ids.

    Raises:
        DatasetError: the dataset already has a val split, or `num_ids` leaves no training identity.
    """
    if num_ids == 0:
        return parsed
    spec = DATASET_SPECS[parsed.name]
    if parsed.splits["val"]:
        raise DatasetError(f"{parsed.name} already has a val split ({len(parsed.splits['val'])} images): "
                           "--val-ids is for datasets without one (ICFG-PEDES); drop --val-ids")
    train_pids = sorted({r.pid for r in parsed.splits["train"]} | parsed.skipped_train_pids)
    if not 0 < num_ids < len(train_pids):
        raise DatasetError(f"--val-ids {num_ids}: {parsed.name} has {len(train_pids)} training identities; "
                           f"choose 1 to {len(train_pids) - 1}")

    def annotation_id(pid: int) -> int:
        return pid + spec.train_pid_offset

    carved_ids = carve_identities((annotation_id(pid) for pid in train_pids), num_ids, "val")
    carved = {pid for pid in train_pids if annotation_id(pid) in carved_ids}
    kept = [pid for pid in train_pids if pid not in carved]
    new_pid = {old: new for new, old in enumerate(kept)}
    train: list[ImageRecord] = []
    val: list[ImageRecord] = []
    for record in parsed.splits["train"]:
        if record.pid in carved:
            val.append(dataclasses.replace(record, image_id=len(val), pid=annotation_id(record.pid)))
        else:
            train.append(dataclasses.replace(record, image_id=len(train), pid=new_pid[record.pid]))
    carved_ids = sorted(annotation_id(pid) for pid in carved)
    logger.info("%s: %d of %d training identities carved into the val split (%d images)", parsed.name,
                num_ids, len(train_pids), len(val))
    return dataclasses.replace(
        parsed, splits={"train": train, "val": val, "test": parsed.splits["test"]},
        skipped_train_pids=frozenset(new_pid[p] for p in parsed.skipped_train_pids if p in new_pid),
        val_from_train={"num_ids": num_ids, "rule": VAL_CARVE_RULE, "ids": carved_ids})
