"""A synthetic person dataset in the CUHK-PEDES on-disk layout: the demo and the test fixture.

Identities with pairwise different attributes are drawn, and each image and caption is rendered by
:mod:`irra_dist.synthetic.render`. The output is ``<out>/imgs/<split>/<id>_<k>.jpg`` plus
``<out>/reid_raw.json`` (fields ``split``, ``id`` (1-based, so the CUHK ``id - 1`` train rule applies),
``file_path``, ``captions``), which ``parse_dataset("CUHK-PEDES", out)`` reads; train, val and test hold
disjoint identities. A side file ``synthetic_attributes.json`` records the generator settings and each
identity's attributes.

Everything is derived from the seed and the image's (split, id, index), never from worker state, so the
same seed gives byte-identical files for any number of workers.

Command line: ``python -m irra_dist.engine.synthetic_cli --out DIR [--train-ids N --val-ids N --test-ids N
--seed S --workers W --overwrite]``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from irra_dist.synthetic.render import PersonAttributes, describe, render_person, sample_attributes

logger = logging.getLogger(__name__)

ANNOTATION_FILE = "reid_raw.json"
ATTRIBUTES_FILE = "synthetic_attributes.json"
GENERATOR_VERSION = 1
JPEG_QUALITY = 90


class DatasetExistsError(FileExistsError):
    """The output folder exists and overwriting was not asked for."""


@dataclass(frozen=True)
class _ImageJob:
    rel_path: str
    rng_key: str
    attrs: PersonAttributes


def _render_jobs(img_dir: str, seed: int, jobs: Sequence[_ImageJob]) -> None:
    for job in jobs:
        image, _ = render_person(job.attrs, random.Random(job.rng_key), seed)
        image.save(os.path.join(img_dir, job.rel_path), "JPEG", quality=JPEG_QUALITY)


def _parse_images_per_id(images_per_id: int | tuple[int, int]) -> tuple[int, int]:
    low, high = (images_per_id, images_per_id) if isinstance(images_per_id, int) else tuple(images_per_id)
    if not 1 <= low <= high:
        raise ValueError(f"images_per_id must be an integer >= 1 or a pair (min, max) with 1 <= min <= max, "
                         f"got {images_per_id!r}")
    return low, high


def _unique_attributes(count: int, rng: random.Random) -> list[PersonAttributes]:
    """Rejection-sample ``count`` identities with pairwise different caption attributes."""
    people: list[PersonAttributes] = []
    seen: set[tuple[str, ...]] = set()
    # The attribute space has about 4 x 10^7 combinations, so rejections are rare; bound them anyway.
    for _ in range(count * 100 + 1000):
        if len(people) == count:
            break
        attrs = sample_attributes(rng)
        if attrs.key not in seen:
            seen.add(attrs.key)
            people.append(attrs)
    if len(people) < count:
        raise ValueError(f"could not draw {count} identities with unique attributes: ask for fewer ids")
    return people


def generate_synthetic_dataset(out_dir: str | os.PathLike, *, num_train_ids: int = 500,
                               num_val_ids: int = 100, num_test_ids: int = 100,
                               images_per_id: int | tuple[int, int] = (2, 4), captions_per_image: int = 2,
                               seed: int = 0, workers: int = 1, overwrite: bool = False) -> Path:
    """Write the synthetic person dataset in the CUHK-PEDES layout, atomically.

    The dataset is built in a temporary sibling folder and renamed into place, so an interrupted run never
    leaves a folder that looks complete.

    Args:
        out_dir: the dataset folder to create (it will hold reid_raw.json and imgs/).
        num_train_ids: training identities (file ids 1..N, so the train pids are 0..N-1).
        num_val_ids: validation identities, disjoint from the others.
        num_test_ids: test identities, disjoint from the others.
        images_per_id: images per identity, an integer or an inclusive (min, max) range.
        captions_per_image: captions written for each image.
        seed: everything (attributes, images, captions) is a function of it.
        workers: processes drawing images; the output does not depend on it.
        overwrite: replace an existing ``out_dir``.

    Returns:
        The dataset folder.

    Raises:
        DatasetExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ValueError: a count is out of range.
    """
    if num_train_ids < 1 or num_val_ids < 0 or num_test_ids < 0:
        raise ValueError(f"need num_train_ids >= 1 and num_val_ids, num_test_ids >= 0, got "
                         f"{num_train_ids}, {num_val_ids}, {num_test_ids}")
    if captions_per_image < 1 or workers < 1:
        raise ValueError(f"captions_per_image and workers must be >= 1, got {captions_per_image}, {workers}")
    low, high = _parse_images_per_id(images_per_id)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not overwrite:
        raise DatasetExistsError(f"{out} already exists: pass overwrite=True (--overwrite) to replace it, "
                                 "or choose another folder")

    start = time.perf_counter()
    num_ids = num_train_ids + num_val_ids + num_test_ids
    people = _unique_attributes(num_ids, random.Random(f"{seed}:attributes"))
    split_of = ["train"] * num_train_ids + ["val"] * num_val_ids + ["test"] * num_test_ids
    count_rng = random.Random(f"{seed}:counts")
    records, jobs = [], []
    for index, (split, attrs) in enumerate(zip(split_of, people)):
        ident = index + 1  # 1-based like CUHK-PEDES, so the id - 1 train rule gives pids 0..N-1
        for k in range(count_rng.randint(low, high)):
            rel_path = f"{split}/{ident:05d}_{k}.jpg"
            caption_rng = random.Random(f"{seed}:captions:{ident}:{k}")
            captions = [describe(attrs, caption_rng) for _ in range(captions_per_image)]
            records.append({"split": split, "id": ident, "file_path": rel_path, "captions": captions})
            jobs.append(_ImageJob(rel_path, f"{seed}:image:{ident}:{k}", attrs))

    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp) so that the folder gets the umask's permissions, not 0700, once renamed.
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.partial"
    tmp.mkdir()
    try:
        img_dir = tmp / "imgs"
        for split in ("train", "val", "test"):
            (img_dir / split).mkdir(parents=True)
        if workers == 1:
            _render_jobs(str(img_dir), seed, jobs)
        else:
            chunk = max(1, min(64, len(jobs) // (workers * 4) + 1))
            chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for future in [pool.submit(_render_jobs, str(img_dir), seed, c) for c in chunks]:
                    future.result()
        (tmp / ANNOTATION_FILE).write_text(json.dumps(records))
        meta = {"generator_version": GENERATOR_VERSION, "seed": seed, "num_train_ids": num_train_ids,
                "num_val_ids": num_val_ids, "num_test_ids": num_test_ids, "images_per_id": [low, high],
                "captions_per_image": captions_per_image,
                "identities": {str(i + 1): {"split": s, **dataclasses.asdict(a)}
                               for i, (s, a) in enumerate(zip(split_of, people))}}
        (tmp / ATTRIBUTES_FILE).write_text(json.dumps(meta, indent=1))
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - start
    logger.info("wrote %d images of %d identities to %s in %.1f s (%.0f images/s)", len(jobs), len(people),
                out, elapsed, len(jobs) / max(elapsed, 1e-9))
    return out


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder to ``out``; an old ``out`` is moved aside first, then deleted."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not overwrite:
        raise DatasetExistsError(f"{out} appeared while generating: pass overwrite=True (--overwrite) to "
                                 "replace it, or choose another folder")
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, trash / out.name)
    os.rename(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)
