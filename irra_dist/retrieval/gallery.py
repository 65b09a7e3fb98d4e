"""Galleries that free-text search ranks: one split of a shard set, or a folder of images.

- :class:`ShardGallery`: one split of a shard set (a folder with ``manifest.json``, see
  :mod:`irra_dist.data.shards`), person ids known, so each hit can be marked correct or wrong;
- :class:`FolderGallery`: the images under a folder (recursively, sorted by relative path), pids unknown.

Both encode their images with the model's image tower in a fixed order, drop images that cannot be read
(as training does) and expose a ``content_key`` that changes whenever the images may have changed, which
keys the feature cache (:mod:`irra_dist.retrieval.cache`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

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
from irra_dist.model import IRRA
from irra_dist.retrieval.errors import SearchError
from irra_dist.retrieval.index import Items
from irra_dist.tokenizer import tokenize
from irra_dist.visualize import FixedQueries

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


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


def warn_skipped(skipped: Sequence[str], where: str) -> None:
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
            warn_skipped(missing, f"the {self.split} split of {self.shards_dir}")
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
            raise SearchError(f"none of the {len(bad)} images in {self.root} could be read: pass a folder "
                               "of JPEG/PNG images")
        if bad:
            self.drop(bad)
            warn_skipped(bad, str(self.root))
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


# --------------------------------------------------------------------------------------------------
# A gallery as index items (irra-index)


def gallery_items(path: str | os.PathLike, split: str = "test") -> Items:
    """Every image of a gallery: a shard set's split (pids known) or a folder of images (recursively).

    Raises:
        SearchError, ShardError: no such gallery, or no image in it.
    """
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        gallery = ShardGallery(path, split)
        n = len(gallery)
        names = gallery.names(range(n))
        source = {"kind": "shards", "root": str(path.resolve()), "split": split}
        return Items([source], [0] * n, [str(i) for i in range(n)], names,
                     [f"{gallery.content_key}:{i}" for i in range(n)], gallery.pids.tolist())
    folder = FolderGallery(path)
    root = folder.root.resolve()
    keys = []
    for p in folder.paths:
        st = p.stat()
        keys.append(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    n = len(folder)
    return Items([{"kind": "folder", "root": str(root)}], [0] * n, list(folder.rel_paths),
                 list(folder.rel_paths), keys, [None] * n)


class ItemImages(Dataset):
    """The test-transformed images of some items; an unreadable one is flagged, not raised (a DataLoader
    worker's exception would come back as a multi-line traceback)."""

    def __init__(self, items: Items, image_size: tuple[int, int]) -> None:
        self.items, self.image_size = items, image_size
        self._readers: dict[int, RecordReader] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _bytes(self, i: int) -> bytes:
        src_id = self.items.source[i]
        src = self.items.sources[src_id]
        if src["kind"] == "folder":
            return (Path(src["root"]) / self.items.locator[i]).read_bytes()
        if src_id not in self._readers:  # opened in the worker that reads it
            root = src["root"]
            self._readers[src_id] = RecordReader(SplitIndex.load(root, load_manifest(root, verify="none"),
                                                                 src["split"]))
        return self._readers[src_id].read(int(self.items.locator[i]))[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        try:
            image = decode_image(self._bytes(i))
        except (*DECODE_ERRORS, ShardError):
            return torch.zeros(3, *self.image_size), False
        return test_transform(image, self.image_size), True
