"""Streaming training loader (``data.mode: stream``): sequential reads of resampled shards, for corpora that
are read as streams (object storage, HTTP, ``pipe:``) rather than cached for random access.

What a rank reads in an epoch:

- Shard sequence: rounds of shard permutations drawn from ``(seed, epoch, round)``, concatenated (shards
  are resampled, so an epoch can read a shard more or less often than once).
- Streams: each rank runs V streams (V = its DataLoader workers, at least 1); stream ``j = rank * V + v`` of
  ``S = world_size * V`` reads positions ``j, j + S, j + 2S, ...`` of the shard sequence, so every shard
  occurrence is read by exactly one stream and no two streams (ranks) read the same data.
- Samples: each image's captions become samples; they pass through a shuffle buffer
  (``data.shuffle_buffer``) drawn from ``(seed, epoch, j)``. Augmentation and masks of the p-th sample of
  stream j draw from ``(seed, epoch, j, p)``.
- An epoch is a fixed number of global batches, ``ceil(num_captions / global_batch)`` (floor with
  ``drop_last``), split over ranks like the indexed mode; step t of a rank comes from stream ``t mod V``.
- Resume mid-epoch (``start_batch = k``): each stream replays its shards from the epoch start and drops the
  samples of steps before k without decoding them, so the run continues the same streams.

What it gives up against the indexed mode (:class:`irra_dist.data.pipeline.TrainLoader`): batches depend on
the number of ranks and workers (1 x 2B is not 2 x B, and resume needs the same counts), an epoch is not
exactly one pass over every caption, the identity (P x K) sampler is not available, and a shard whose
stream fails (unreachable, truncated, hash mismatch) stops the run with one line instead of being fetched
again.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from irra_dist.data.pipeline import (
    _READ_ERRORS,
    _STREAM_IMAGE,
    _STREAM_MLM,
    _check_image_size,
    _check_rank,
    _rank_slice,
    _TrainCollate,
    _warn_skip,
    derive_seed,
)
from irra_dist.data.shards import ShardError, VerifyMode, load_manifest
from irra_dist.data.sources import ShardStore, SourceError
from irra_dist.data.transforms import decode_image, train_transform
from irra_dist.masking import mask_tokens
from irra_dist.tokenizer import default_tokenizer, tokenize

_STREAM_SHARDS = 3
_STREAM_SHUFFLE = 4


class _HashingReader:
    """Pass-through reader that counts and hashes what the tar parser reads."""

    def __init__(self, raw) -> None:
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def shard_sequence(num_shards: int, seed: int, epoch: int, stream: int, num_streams: int) -> Iterator[int]:
    """Stream `stream`'s shards: positions stream, stream + S, ... of the epoch's resampled sequence."""
    position = 0
    for round_ in range(1 << 62):
        rng = np.random.Generator(np.random.PCG64(derive_seed(seed, epoch, _STREAM_SHARDS, round_)))
        for shard in rng.permutation(num_shards).tolist():
            if position % num_streams == stream:
                yield shard
            position += 1


class _StreamDataset(IterableDataset):
    def __init__(self, store: ShardStore, shards: list[dict[str, Any]], *, seed: int,
                 image_size: tuple[int, int], image_aug: bool, mlm: bool, shuffle_buffer: int,
                 step_sizes: list[int], rank: int, world_size: int) -> None:
        self.store, self.shards = store, shards
        self.seed, self.image_size, self.image_aug, self.mlm = seed, image_size, image_aug, mlm
        self.shuffle_buffer, self.step_sizes = shuffle_buffer, step_sizes
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch, self.num_streams_per_rank = 1, 0, 1

    def _samples(self, epoch: int, stream: int, num_streams: int) -> Iterator[dict[str, Any]]:
        """(image bytes, caption, pid, image id) of every caption of the stream's shards, in read order."""
        for shard in shard_sequence(len(self.shards), self.seed, epoch, stream, num_streams):
            entry = self.shards[shard]
            name = entry["file"]
            try:
                with self.store.open(name) as raw:
                    reader = _HashingReader(raw)
                    files = tar_file_expander([{"url": name, "stream": reader}])
                    for sample in group_by_keys(files):
                        yield from self._expand(sample, name)
                    reader.drain()
            except (SourceError, OSError, ValueError) as err:
                raise ShardError(f"streaming shard {name} of {self.store.location} failed ({err}): check "
                                 "data.shards and the network, or rebuild and re-upload the set") from None
            if reader.size != entry["bytes"] or reader.sha.hexdigest() != entry["sha256"]:
                raise ShardError(f"streamed shard {name} of {self.store.location} does not match its "
                                 f"manifest entry ({reader.size} of {entry['bytes']} bytes, or another "
                                 "SHA-256): rebuild and re-upload the set")

    @staticmethod
    def _expand(sample: dict[str, Any], shard: str) -> Iterator[dict[str, Any]]:
        images = [k for k in sample if not k.startswith("__") and k != "json"]
        try:
            meta = json.loads(sample["json"])
            captions, pid = list(meta["captions"]), int(meta["pid"])
        except (KeyError, ValueError, TypeError) as err:
            _warn_skip(f"sample {sample.get('__key__')} of {shard} has no readable json ({err})")
            return
        image = sample[images[0]] if len(images) == 1 else None
        for caption in captions:
            yield {"image": image, "caption": caption, "pid": pid, "image_id": int(meta.get("image_id", -1)),
                   "where": f"{sample.get('__key__')} of {shard}"}

    def _make(self, item: dict[str, Any], epoch: int, stream: int, position: int) -> dict[str, Any] | None:
        try:
            if item["image"] is None:
                raise KeyError("not exactly one image member")
            image = decode_image(item["image"])
        except _READ_ERRORS as err:
            _warn_skip(f"streamed sample {item['where']} is unreadable: {err}")
            return None
        seed = (self.seed, epoch, stream, position)
        image_seed = derive_seed(*seed, _STREAM_IMAGE)
        out = {"images": train_transform(image, image_seed, self.image_size, self.image_aug),
               "caption_ids": tokenize(item["caption"]), "pids": item["pid"], "image_ids": item["image_id"],
               "sample_index": position}
        if self.mlm:
            mlm_gen = torch.Generator().manual_seed(derive_seed(*seed, _STREAM_MLM))
            out["mlm_ids"], out["mlm_labels"] = mask_tokens(out["caption_ids"], mlm_gen)
        return out

    def __iter__(self) -> Iterator[list[dict[str, Any] | None]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start = self.epoch, self.start_batch
        # The DataLoader takes batches from workers round-robin from worker 0, so worker w serves steps
        # start + w, start + w + V, ...: stream (start + w) mod V, whichever step the iteration starts at.
        local = (start + worker) % num_workers
        stream = self.rank * num_workers + local
        rng = random.Random(derive_seed(self.seed, epoch, stream, _STREAM_SHUFFLE))
        samples = wds.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(
            self._samples(epoch, stream, self.world_size * num_workers))
        position = 0
        for step in range(local, len(self.step_sizes), num_workers):
            lo, hi = _rank_slice(self.step_sizes[step], self.rank, self.world_size)
            items = [next(samples) for _ in range(hi - lo)]
            if step >= start:
                yield [self._make(item, epoch, stream, position + i) for i, item in enumerate(items)]
            position += hi - lo


class StreamTrainLoader:
    """This rank's training batches read as streams (see the module docstring); the TrainLoader interface.

    Batches have the keys of :class:`irra_dist.data.pipeline.TrainLoader`'s, except that ``sample_index`` is
    the sample's position in its stream.
    """

    def __init__(self, shards_dir: str | os.PathLike, *, global_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 1, num_workers: int = 0,
                 image_size: tuple[int, int] = (384, 128), image_aug: bool = True, drop_last: bool = False,
                 mlm: bool = True, mask_global_text: bool = True, shuffle_buffer: int = 2000,
                 verify: VerifyMode = True, pin_memory: bool = False, prefetch_factor: int = 2,
                 cache_dir: str | os.PathLike | None = None, cache_max_gb: float | None = None) -> None:
        """Read the manifest (no shard is opened yet) and set up the streams.

        Args:
            shards_dir: a local folder, ``http(s)://`` URL or ``pipe:`` command (see
                :mod:`irra_dist.data.sources`).
            shuffle_buffer: samples in each stream's shuffle buffer.
            cache_dir, cache_max_gb: unused (streams are not cached); accepted so both loaders take the same
                arguments.
            Others: as :class:`irra_dist.data.pipeline.TrainLoader`.

        Raises:
            ShardError: no readable manifest, no training captions, or pre-resized images of another size.
        """
        _check_rank(rank, world_size)
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        store = ShardStore(shards_dir)
        self.manifest = load_manifest(shards_dir, verify, store=store)
        image_size = _check_image_size(self.manifest, image_size, shards_dir)
        train = self.manifest["splits"].get("train", {})
        self.num_samples = int(train.get("num_captions", 0))
        if self.num_samples == 0 or not train.get("shards"):
            raise ShardError(f"{shards_dir} has no training captions: rebuild the shards from a dataset with "
                             "a captioned train split")
        self.num_train_ids = int(self.manifest["num_train_ids"])
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch_size = global_batch_size
        n, size = self.num_samples, global_batch_size
        num = n // size if drop_last else -(-n // size)
        self._step_sizes = [min(size, n - k * size) for k in range(num)]
        self.skipped = 0
        self.start_batch = 0
        default_tokenizer()
        self._dataset = _StreamDataset(store, list(train["shards"]), seed=seed, image_size=image_size,
                                       image_aug=image_aug, mlm=mlm, shuffle_buffer=shuffle_buffer,
                                       step_sizes=self._step_sizes, rank=rank, world_size=world_size)
        # Workers are started per epoch (not persistent) so that they see the epoch and the start batch.
        self._loader = DataLoader(self._dataset, batch_size=None, num_workers=num_workers,
                                  collate_fn=_TrainCollate(image_size, mlm, mask_global_text),
                                  pin_memory=pin_memory,
                                  prefetch_factor=prefetch_factor if num_workers > 0 else None)

    @property
    def epoch(self) -> int:
        return self._dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (1-based) that the next iteration yields."""
        if epoch < 1:
            raise ValueError(f"epochs are 1-based, got {epoch}")
        self._dataset.epoch = epoch

    def num_batches(self, epoch: int) -> int:
        """Global batches per epoch (the same for every epoch)."""
        return len(self._step_sizes)

    def __len__(self) -> int:
        return len(self._step_sizes)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._dataset.start_batch, self.start_batch = self.start_batch, 0
        try:
            for batch in self._loader:
                self.skipped += batch.pop("num_skipped")
                yield batch
        except ShardError as err:
            # A worker's error arrives with the worker's traceback in its message: keep the one line.
            last = str(err).strip().splitlines()[-1]
            raise ShardError(last.split("ShardError: ", 1)[-1]) from None
