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
- Mixtures (a list of :class:`irra_dist.data.mixture.TrainSource`): every position of the epoch's global
  sample sequence is labelled with a source by weight (:func:`irra_dist.data.mixture.epoch_source_labels`,
  exact shares, independent of ranks and workers); a stream runs one shard sequence and one shuffle buffer
  per source (opened when first drawn from) and takes the next sample of the labelled source. Pids are
  shifted per source as in the indexed mode (:func:`irra_dist.data.mixture.identity_offsets`).

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
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from irra_dist.data.mixture import (
    TrainSource,
    epoch_source_labels,
    has_identities,
    identity_offsets,
    split_by_weight,
)
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


def shard_sequence(num_shards: int, seed: int, epoch: int, stream: int, num_streams: int,
                   source: int = 0) -> Iterator[int]:
    """Stream `stream`'s shards of mixture source `source`: positions stream, stream + S, ... of the epoch's
    resampled sequence of that source."""
    # Source 0 draws from the key a single set always used, so single-set runs keep their order and resume.
    key = (_STREAM_SHARDS,) if source == 0 else (_STREAM_SHARDS, source)
    position = 0
    for round_ in range(1 << 62):
        rng = np.random.Generator(np.random.PCG64(derive_seed(seed, epoch, *key, round_)))
        for shard in rng.permutation(num_shards).tolist():
            if position % num_streams == stream:
                yield shard
            position += 1


class _StreamSource:
    """One shard set read as streams: where it is, its train shards and where its identities start."""

    def __init__(self, store: ShardStore, shards: list[dict[str, Any]], num_train_ids: int,
                 pid_offset: int) -> None:
        self.store, self.shards = store, shards
        self.num_train_ids, self.pid_offset = num_train_ids, pid_offset


class _StreamDataset(IterableDataset):
    def __init__(self, sources: list[_StreamSource], weights: list[float] | None, *, seed: int,
                 image_size: tuple[int, int], image_aug: bool, mlm: bool, shuffle_buffer: int,
                 step_sizes: list[int], rank: int, world_size: int) -> None:
        self.sources, self.weights = sources, weights
        self.seed, self.image_size, self.image_aug, self.mlm = seed, image_size, image_aug, mlm
        self.shuffle_buffer, self.step_sizes = shuffle_buffer, step_sizes
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 1, 0

    def _samples(self, s: int, epoch: int, stream: int, num_streams: int) -> Iterator[dict[str, Any]]:
        """(image bytes, caption, pid, image id) of every caption of the stream's shards of source `s`, in
        read order."""
        source = self.sources[s]
        for shard in shard_sequence(len(source.shards), self.seed, epoch, stream, num_streams, s):
            entry = source.shards[shard]
            name = entry["file"]
            try:
                with source.store.open(name) as raw:
                    reader = _HashingReader(raw)
                    files = tar_file_expander([{"url": name, "stream": reader}])
                    for sample in group_by_keys(files):
                        yield from self._expand(sample, name, source)
                    reader.drain()
            except (SourceError, OSError, ValueError) as err:
                raise ShardError(f"streaming shard {name} of {source.store.location} failed ({err}): check "
                                 "data.shards and the network, or rebuild and re-upload the set") from None
            if reader.size != entry["bytes"] or reader.sha.hexdigest() != entry["sha256"]:
                raise ShardError(f"streamed shard {name} of {source.store.location} does not match its "
                                 f"manifest entry ({reader.size} of {entry['bytes']} bytes, or another "
                                 "SHA-256): rebuild and re-upload the set")

    @staticmethod
    def _expand(sample: dict[str, Any], shard: str, source: _StreamSource) -> Iterator[dict[str, Any]]:
        images = [k for k in sample if not k.startswith("__") and k != "json"]
        try:
            meta = json.loads(sample["json"])
            captions, pid = list(meta["captions"]), int(meta["pid"])
        except (KeyError, ValueError, TypeError) as err:
            _warn_skip(f"sample {sample.get('__key__')} of {shard} has no readable json ({err})")
            return
        if not 0 <= pid < source.num_train_ids:  # it would train another identity's (or source's) class
            raise ShardError(f"sample {sample.get('__key__')} of {shard} of {source.store.location} has pid "
                             f"{pid}, outside its manifest's num_train_ids={source.num_train_ids}: rebuild "
                             "the shards")
        image = sample[images[0]] if len(images) == 1 else None
        for caption in captions:
            yield {"image": image, "caption": caption, "pid": pid + source.pid_offset,
                   "image_id": int(meta.get("image_id", -1)), "where": f"{sample.get('__key__')} of {shard}"}

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
        num_streams = self.world_size * num_workers
        streams: dict[int, Iterator[dict[str, Any]]] = {}

        def next_of(s: int) -> dict[str, Any]:
            if s not in streams:  # a source this stream never draws from is never opened
                key = (_STREAM_SHUFFLE,) if s == 0 else (_STREAM_SHUFFLE, s)
                rng = random.Random(derive_seed(self.seed, epoch, stream, *key))
                streams[s] = wds.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(
                    self._samples(s, epoch, stream, num_streams))
            return next(streams[s])

        labels = (epoch_source_labels(sum(self.step_sizes), self.weights, self.seed, epoch)
                  if self.weights is not None else None)
        step_start = np.concatenate([[0], np.cumsum(self.step_sizes)]).tolist()
        position = 0
        for step in range(local, len(self.step_sizes), num_workers):
            lo, hi = _rank_slice(self.step_sizes[step], self.rank, self.world_size)
            drawn = (labels[step_start[step] + lo:step_start[step] + hi].tolist() if labels is not None
                     else [0] * (hi - lo))
            items = [next_of(s) for s in drawn]
            if step >= start:
                yield [self._make(item, epoch, stream, position + i) for i, item in enumerate(items)]
            position += hi - lo


class StreamTrainLoader:
    """This rank's training batches read as streams (see the module docstring); the TrainLoader interface.

    Batches have the keys of :class:`irra_dist.data.pipeline.TrainLoader`'s, except that ``sample_index`` is
    the sample's position in its stream.
    """

    def __init__(self, shards_dir: str | os.PathLike | Sequence[TrainSource], *, global_batch_size: int,
                 rank: int = 0,
                 world_size: int = 1, seed: int = 1, num_workers: int = 0,
                 image_size: tuple[int, int] = (384, 128), image_aug: bool = True, drop_last: bool = False,
                 mlm: bool = True, mask_global_text: bool = True, shuffle_buffer: int = 2000,
                 verify: VerifyMode = True, pin_memory: bool = False, prefetch_factor: int = 2,
                 cache_dir: str | os.PathLike | None = None, cache_max_gb: float | None = None) -> None:
        """Read the manifest (no shard is opened yet) and set up the streams.

        Args:
            shards_dir: a local folder, ``http(s)://`` URL or ``pipe:`` command (see
                :mod:`irra_dist.data.sources`), or a list of :class:`~irra_dist.data.mixture.TrainSource`: a
                mixture (module docstring). An epoch has as many samples as the sources together.
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
        mixture = not isinstance(shards_dir, (str, os.PathLike))
        sources = list(shards_dir) if mixture else [TrainSource(shards_dir)]
        if not sources:
            raise ValueError("a mixture needs at least one source")
        self.source_manifests: dict[str, dict[str, Any]] = {}
        stores, shard_lists = [], []
        self.num_samples = 0
        for source in sources:
            store = ShardStore(source.location)
            manifest = load_manifest(source.location, verify, store=store)
            image_size = _check_image_size(manifest, image_size, source.location)
            train = manifest["splits"].get("train", {})
            num_captions = int(train.get("num_captions", 0))
            if num_captions == 0 or not train.get("shards"):
                raise ShardError(f"{source.location} has no training captions: rebuild the shards from a "
                                 "dataset with a captioned train split")
            if source.label in self.source_manifests:
                raise ValueError(f"two sources are named {source.label!r}: give them distinct names")
            self.source_manifests[source.label] = manifest
            stores.append(store)
            shard_lists.append(list(train["shards"]))
            self.num_samples += num_captions
        # Identity namespaces stay apart; labelled sources first, so their identities are the ID classes.
        ids = [int(m["num_train_ids"]) for m in self.source_manifests.values()]
        offsets, self.num_id_classes = identity_offsets(
            ids, [has_identities(m) for m in self.source_manifests.values()])
        self.num_train_ids = sum(ids)
        streamed = [_StreamSource(*parts) for parts in zip(stores, shard_lists, ids, offsets)]
        self.manifest = next(iter(self.source_manifests.values()))
        """The (first) source's manifest."""
        self.source_names = list(self.source_manifests)
        self.source_weights = [float(source.weight) for source in sources]
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch_size = global_batch_size
        n, size = self.num_samples, global_batch_size
        num = n // size if drop_last else -(-n // size)
        self._step_sizes = [min(size, n - k * size) for k in range(num)]
        self.skipped = 0
        self.start_batch = 0
        default_tokenizer()
        self._dataset = _StreamDataset(streamed, self.source_weights if mixture else None, seed=seed,
                                       image_size=image_size, image_aug=image_aug, mlm=mlm,
                                       shuffle_buffer=shuffle_buffer, step_sizes=self._step_sizes, rank=rank,
                                       world_size=world_size)
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

    def source_counts(self, epoch: int | None = None) -> dict[str, int]:
        """Samples each source gives an epoch (all ranks), by source name: the same for every epoch."""
        counts = split_by_weight(sum(self._step_sizes), self.source_weights)
        return dict(zip(self.source_names, counts.tolist()))

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
