"""Train and evaluation loaders over the shards, with global batches that do not depend on the process count.

Training (:class:`TrainLoader`):

- A training sample is one caption of one image (IRRA_SPEC 3.5). Each epoch orders all samples from
  ``(seed, epoch)`` only: a permutation (sampler ``"random"``, every caption exactly once), or the official
  RandomIdentitySampler's P identities x K captions (sampler ``"identity"``). The order is cut into global
  batches of ``global_batch_size``; the last partial one is kept (official) unless ``drop_last``.
- Rank r of W loads the r-th contiguous slice of each global batch; slice sizes differ by at most one
  (``numpy.array_split``). When a global batch has fewer samples than ranks (only possible for the last
  one), ranks ``r >= len(batch)`` get a batch with zero rows, so every rank steps the same number of times.
- Augmentation and MLM masking of the sample at position p of the epoch draw from generators seeded by
  ``(seed, epoch, p)``, never from worker or rank state: one process with batch 2B and two with B each see
  the same samples with identical pixels and masks.
- Records are read by position through ``wids`` (indexed, memory-mapped tars; each DataLoader worker keeps its
  own open shards); decoding, augmentation, tokenisation and masking run in DataLoader workers. Remote sets
  (``http(s)://``, ``pipe:``) are read from a verified local cache (:mod:`irra_dist.data.sources`).
- A corrupt image or a cut-short record is skipped with a rate-limited warning: its batch has one row
  fewer, and :attr:`TrainLoader.skipped` counts it (summed over workers; per rank).

Keep these loaders out of ``accelerator.prepare()``: they already shard by rank.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from irra_dist.data.mixture import TrainSource, draw_epoch, has_identities, identity_offsets
from irra_dist.data.shards import (
    _REBUILD_HINT,
    MANIFEST_NAME,
    RecordError,
    RecordReader,
    ShardError,
    SplitIndex,
    VerifyMode,
    load_manifest,
)
from irra_dist.data.sources import ShardStore
from irra_dist.data.transforms import DECODE_ERRORS, decode_image, test_transform, train_transform
from irra_dist.masking import mask_tokens
from irra_dist.tokenizer import CONTEXT_LENGTH, default_tokenizer, tokenize

logger = logging.getLogger(__name__)

# Separate seed streams, so that e.g. turning augmentation off leaves the masks unchanged.
_STREAM_ORDER = 0
_STREAM_IMAGE = 1
_STREAM_MLM = 2
_READ_ERRORS = (*DECODE_ERRORS, RecordError, KeyError, IndexError, TypeError)


def derive_seed(*parts: int) -> int:
    """An independent 63-bit seed for (run seed, epoch, position, stream), drawn by NumPy's ``SeedSequence``.

    The run seed is the entropy and the other parts the spawn key (the path to a child sequence), so keys
    that differ in any part (each below 2**32) or in length give unrelated seeds.

    Args:
        *parts: integers, the run seed first; negative values are taken modulo 2**64.

    Returns:
        A seed in ``[0, 2**63)`` for ``torch.Generator.manual_seed``, ``random.Random`` or numpy.
    """
    entropy, *key = (part % (1 << 64) for part in parts)
    return int(np.random.SeedSequence(entropy, spawn_key=key).generate_state(1, np.uint64)[0] >> 1)


class _RateLimitedWarning:
    """Log the first few skips, then at most one line per interval saying how many were suppressed.

    One instance per process, so each DataLoader worker limits its own lines.
    """

    def __init__(self, first: int = 5, interval_s: float = 30.0) -> None:
        self.first, self.interval_s = first, interval_s
        self.count, self.suppressed, self.last = 0, 0, 0.0

    def __call__(self, message: str) -> None:
        self.count += 1
        now = time.monotonic()
        if self.count <= self.first or now - self.last >= self.interval_s:
            extra = f" ({self.suppressed} similar warnings suppressed)" if self.suppressed else ""
            logger.warning("%s; skipped%s", message, extra)
            self.last, self.suppressed = now, 0
        else:
            self.suppressed += 1


_warn_skip = _RateLimitedWarning()


def _rank_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous ``[lo, hi)`` of n items; sizes differ by at most one, earlier ranks larger."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}: pass the "
                         "process index and count from the launcher")


def _check_image_size(manifest: dict[str, Any], image_size: tuple[int, int], shards_dir: str | os.PathLike,
                      ) -> tuple[int, int]:
    size = (int(image_size[0]), int(image_size[1]))
    stored = manifest.get("image_size")
    if stored is not None and tuple(stored) != size:
        raise ShardError(f"{shards_dir}/{MANIFEST_NAME}: images were pre-resized to {stored[0]}x{stored[1]} "
                         f"but the loader wants {size[0]}x{size[1]}: rebuild with --pre-resize "
                         f"{size[0]}x{size[1]} (or without it), or set model.image_size to {list(stored)}")
    return size


def open_split(shards_dir: str | os.PathLike, split: str, *, verify: VerifyMode = True,
               cache_dir: str | os.PathLike | None = None, cache_max_gb: float | None = None,
               ) -> tuple[dict[str, Any], SplitIndex]:
    """The manifest and one split's index of a local or remote shard set, checked before any loading.

    For a remote set whose split fits in the cache, every shard is fetched and verified here, so that a
    404, a truncated transfer or a hash mismatch stops the run before its first step.

    Raises:
        ShardError: see :func:`irra_dist.data.shards.load_manifest` and :meth:`ShardStore.shard_path`.
    """
    cap = None if cache_max_gb is None else int(cache_max_gb * 2**30)
    store = ShardStore(shards_dir, cache_dir=cache_dir, cache_max_bytes=cap)
    manifest = load_manifest(shards_dir, verify, store=store)
    index = SplitIndex.load(shards_dir, manifest, split, store=store)
    if store.remote and (cap is None or sum(e["bytes"] for e in index.shard_entries) <= cap):
        for entry in index.shard_entries:
            store.shard_path(entry["file"], entry["bytes"], entry["sha256"])
    return manifest, index


def _fatal(items: list[dict[str, Any] | None]) -> str | None:
    """The message of a fatal error (a remote shard that cannot be fetched) reported by a worker, if any."""
    return next((item["fatal"] for item in items if item is not None and "fatal" in item), None)


def _stack(items: list[dict[str, Any]], key: str, empty_shape: tuple[int, ...], dtype: torch.dtype,
           ) -> torch.Tensor:
    if not items:
        return torch.empty(empty_shape, dtype=dtype)
    values = [item[key] for item in items]
    return torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.tensor(values, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Training


class _TrainDataset(Dataset):
    """Map-style dataset whose index is ``(epoch, position, sample)``; everything random follows from it.

    Sample s is caption ``sample_caption[s]`` of record ``sample_record[s]`` of source ``sample_source[s]``;
    a source's pids are shifted by ``pid_offset[source]`` so that the sources' identities stay apart.
    """

    def __init__(self, indexes: list[SplitIndex], sample_source: np.ndarray, sample_record: np.ndarray,
                 sample_caption: np.ndarray, pid_offset: list[int], *, seed: int, image_size: tuple[int, int],
                 image_aug: bool, mlm: bool) -> None:
        self.readers = [RecordReader(index) for index in indexes]
        self.sample_source, self.sample_record = sample_source, sample_record
        self.sample_caption = sample_caption
        self.pid_offset = pid_offset
        self.seed, self.image_size, self.image_aug, self.mlm = seed, image_size, image_aug, mlm

    def __len__(self) -> int:
        return len(self.sample_record)

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any] | None:
        epoch, position, sample = item
        source = int(self.sample_source[sample])
        record = int(self.sample_record[sample])
        reader = self.readers[source]
        index = reader.index
        try:
            image_bytes, meta_bytes = reader.read(record)
            caption = json.loads(meta_bytes)["captions"][int(self.sample_caption[sample])]
            image = decode_image(image_bytes)
        except ShardError as err:  # not a bad sample: a shard that cannot be fetched stops the run
            return {"fatal": str(err)}
        except _READ_ERRORS as err:
            _warn_skip(f"train sample {sample} (record {record} in "
                       f"{index.shard_files[int(index.shard[record])]}) is unreadable: {err}")
            return None
        image_seed = derive_seed(self.seed, epoch, position, _STREAM_IMAGE)
        out = {"images": train_transform(image, image_seed, self.image_size, self.image_aug),
               "caption_ids": tokenize(caption),
               "pids": int(index.pid[record]) + self.pid_offset[source],
               "image_ids": int(index.image_id[record]),
               "sample_index": sample}
        if self.mlm:
            mlm_gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, position, _STREAM_MLM))
            out["mlm_ids"], out["mlm_labels"] = mask_tokens(out["caption_ids"], mlm_gen)
        return out


class _TrainCollate:
    """Stack the readable samples of one rank's slice; count the skipped ones."""

    def __init__(self, image_size: tuple[int, int], mlm: bool, mask_global_text: bool) -> None:
        self.image_size, self.mlm, self.mask_global_text = image_size, mlm, mask_global_text

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        if (fatal := _fatal(items)) is not None:
            return {"fatal": fatal}
        good = [item for item in items if item is not None]
        n = len(good)
        batch: dict[str, Any] = {
            "images": _stack(good, "images", (n, 3, *self.image_size), torch.float32),
            "caption_ids": _stack(good, "caption_ids", (n, CONTEXT_LENGTH), torch.int64),
            "pids": _stack(good, "pids", (n,), torch.int64),
            "image_ids": _stack(good, "image_ids", (n,), torch.int64),
            "sample_index": _stack(good, "sample_index", (n,), torch.int64),
        }
        if self.mlm:
            masked = _stack(good, "mlm_ids", (n, CONTEXT_LENGTH), torch.int64)
            batch["mlm_labels"] = _stack(good, "mlm_labels", (n, CONTEXT_LENGTH), torch.int64)
            if self.mask_global_text:
                # The official aliasing: SDM/ID see the masked caption (IRRA_SPEC 3.3). Carried once, so
                # that the model runs the text tower once for both branches.
                batch["caption_ids"] = masked
            else:
                batch["mlm_ids"] = masked
        batch["num_skipped"] = len(items) - n
        return batch


class _RankBatchSampler:
    """Plans each epoch's global batches and yields this rank's slices as ``(epoch, position, sample)``.

    Lives in the main process (the DataLoader iterates it there), so changing the epoch or the start batch
    between iterations reaches persistent workers without restarting them. It holds no reference back to
    the TrainLoader: without a reference cycle the workers shut down as soon as the loader is dropped.
    """

    def __init__(self, sample_pid: np.ndarray, *, seed: int, global_batch_size: int, sampler: str,
                 num_instances: int, drop_last: bool, rank: int, world_size: int,
                 mixture: tuple[list[int], list[float]] | None = None) -> None:
        self.sample_pid = sample_pid
        self.mixture = mixture
        """(samples per source, weights) of a mixture, whose epochs are drawn by weight; None: one source."""
        self.seed, self.global_batch_size, self.sampler = seed, global_batch_size, sampler
        self.num_instances, self.drop_last = num_instances, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 1
        self.start_batch = 0
        self._cache: tuple[int, tuple[np.ndarray, list[tuple[int, int]]]] | None = None

    def plan(self, epoch: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """The epoch's sample order and its global batches as ``[start, stop)`` ranges into it (cached)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.Generator(np.random.PCG64(derive_seed(self.seed, epoch, _STREAM_ORDER)))
        # A mixture's epoch is a multiset of samples drawn by the weights; it is then ordered like one source.
        pool = None if self.mixture is None else draw_epoch(*self.mixture, self.seed, epoch)
        pids = self.sample_pid if pool is None else self.sample_pid[pool]
        size = self.global_batch_size
        if self.sampler == "identity":
            num_pids = size // self.num_instances
            size = num_pids * self.num_instances
            order = _identity_order(pids, self.num_instances, num_pids, rng)
        else:
            order = rng.permutation(len(pids))
        if pool is not None:
            order = pool[order]
        n = len(order)
        num = n // size if self.drop_last or self.sampler == "identity" else -(-n // size)
        bounds = [(k * size, min(n, (k + 1) * size)) for k in range(num)]
        self._cache = (epoch, (order, bounds))
        return order, bounds

    def __len__(self) -> int:
        return max(0, len(self.plan(self.epoch)[1]) - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch = self.epoch  # fixed for the whole pass, even if set_epoch() is called meanwhile
        order, bounds = self.plan(epoch)
        for start, stop in bounds[self.start_batch:]:
            lo, hi = _rank_slice(stop - start, self.rank, self.world_size)
            yield [(epoch, p, int(order[p])) for p in range(start + lo, start + hi)]


def _check_train_ids(index: SplitIndex, manifest: dict[str, Any], shards_dir: str | os.PathLike) -> None:
    """What training relies on, checked before it starts: every train pid is a class of the ID classifier
    (0 <= pid < num_train_ids) and the caption count is the manifest's (an edited or mismatched manifest
    would otherwise fail mid-step, e.g. a target out of bounds in the ID loss).

    Raises:
        ShardError: one line naming the disagreement.
    """
    where = os.path.join(shards_dir, MANIFEST_NAME)
    num_ids = manifest.get("num_train_ids")
    if isinstance(num_ids, bool) or not isinstance(num_ids, int) or num_ids < 1:
        raise ShardError(f"{where} has num_train_ids={num_ids!r}, not a positive integer: "
                         f"{_REBUILD_HINT.format(out=shards_dir)}")
    low, high = int(index.pid.min()), int(index.pid.max())
    if low < 0 or high >= num_ids:
        raise ShardError(f"{where} says num_train_ids={num_ids} but the train split has person id "
                         f"{high if high >= num_ids else low} (ids must lie in 0..{num_ids - 1}): "
                         f"{_REBUILD_HINT.format(out=shards_dir)}")
    captions = manifest["splits"]["train"].get("num_captions")
    if captions is not None and int(captions) != int(index.num_captions.sum()):
        raise ShardError(f"{where} says the train split has {captions} captions but its index holds "
                         f"{int(index.num_captions.sum())}: {_REBUILD_HINT.format(out=shards_dir)}")


class TrainLoader:
    """This rank's training batches; the global batch sequence depends only on (seed, epoch, batch size).

    Batches are dicts: ``images [b,3,H,W]`` float32, ``caption_ids [b,77]``, ``pids [b]``, ``image_ids [b]``,
    ``sample_index [b]`` (global sample index: the caption's position in the training split) and, with
    ``mlm``, ``mlm_labels [b,77]``; all integer tensors are int64. Which captions ``caption_ids`` holds is
    decided here, not in the model: with ``mlm`` and ``mask_global_text`` the masked ones (the official
    aliasing; the model's MLM branch reads them too); with ``mlm`` only, the clean ones and the masked ones
    as ``mlm_ids [b,77]``. ``b`` is this rank's share of the global batch minus skipped samples (0 is
    possible).

    Attributes:
        start_batch: skip the first k global batches of the next iteration without loading them (resume);
            consumed by ``__iter__`` and reset to 0.
        num_train_ids: training identities (all sources of a mixture), from the manifests.
        num_id_classes: the ID classifier's size: the identities of the sources with identity labels (all
            of them for one labelled set; 0 for a set built without pids).
        num_samples: training samples (captions) in the split.
        skipped: corrupt samples this rank has skipped so far (all its workers, all epochs).
        manifest: the shard set's manifest.
    """

    def __init__(self, shards_dir: str | os.PathLike | Sequence[TrainSource], *, global_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 1, num_workers: int = 0,
                 image_size: tuple[int, int] = (384, 128), image_aug: bool = True,
                 sampler: Literal["random", "identity"] = "random", num_instances: int = 4,
                 drop_last: bool = False, mlm: bool = True, mask_global_text: bool = True,
                 verify: VerifyMode = True, pin_memory: bool = False, prefetch_factor: int = 2,
                 cache_dir: str | os.PathLike | None = None, cache_max_gb: float | None = None) -> None:
        """Open the shard set, check it against its manifest, and set up (not start) the workers.

        Args:
            shards_dir: folder (or URL) with manifest.json (see :func:`irra_dist.data.shards.build_shards`),
                or a list of :class:`~irra_dist.data.mixture.TrainSource`: a mixture, each epoch drawn by
                the sources' weights (:mod:`irra_dist.data.mixture`), identities kept apart.
            global_batch_size: samples per optimizer micro-step over all ranks (identity sampler: P x K
                with P = global_batch_size // num_instances; every global batch is full).
            rank: this process's index.
            world_size: number of processes.
            seed: run seed; with the epoch it fixes the order, augmentation and masks.
            num_workers: DataLoader worker processes for this rank (0: load in this process).
            image_size: ``(height, width)`` of the images.
            image_aug: the official flip + pad/crop + erasing augmentation (False: flip only).
            sampler: ``"random"`` (a permutation of all captions) or ``"identity"`` (P x K).
            num_instances: K, captions per identity in a global batch (identity sampler).
            drop_last: drop the last partial global batch (random sampler; the identity sampler never
                makes one).
            mlm: mask the captions for the MLM loss (``mlm_labels``, and ``mlm_ids`` or masked
                ``caption_ids``).
            mask_global_text: with ``mlm``, ``caption_ids`` is the masked caption (official) and there is no
                ``mlm_ids``; else ``caption_ids`` is the clean caption.
            verify: shard check before loading, see :func:`irra_dist.data.shards.load_manifest`.
            pin_memory: pin batches for faster host-to-GPU copies.
            prefetch_factor: batches prefetched per worker.
            cache_dir: local cache of a remote set's shards (default ``~/.cache/irra_dist/shards``).
            cache_max_gb: size cap of that cache (None: none).

        Raises:
            ShardError: missing or mismatching shards, or pre-resized images of another size.
            ValueError: inconsistent arguments.
        """
        _check_rank(rank, world_size)
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if sampler not in ("random", "identity"):
            raise ValueError(f"sampler must be 'random' or 'identity', got {sampler!r}")
        if sampler == "identity" and not 1 <= num_instances <= global_batch_size:
            raise ValueError(f"the identity sampler needs 1 <= num_instances <= global_batch_size, got "
                             f"num_instances {num_instances}, global_batch_size {global_batch_size}: lower "
                             "data.num_instances or raise the batch size")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        mixture = not isinstance(shards_dir, (str, os.PathLike))
        sources = list(shards_dir) if mixture else [TrainSource(shards_dir)]
        if not sources:
            raise ValueError("a mixture needs at least one source")
        indexes: list[SplitIndex] = []
        self.source_manifests: dict[str, dict[str, Any]] = {}
        for source in sources:
            manifest, index = open_split(source.location, "train", verify=verify, cache_dir=cache_dir,
                                         cache_max_gb=cache_max_gb)
            image_size = _check_image_size(manifest, image_size, source.location)
            # Images without captions give no sample, so count captions, not images.
            if int(index.num_captions.sum()) == 0:
                raise ShardError(f"{source.location} has no training captions: rebuild the shards from a "
                                 "dataset with a captioned train split")
            _check_train_ids(index, manifest, source.location)
            if source.label in self.source_manifests:
                raise ValueError(f"two sources are named {source.label!r}: give them distinct names")
            self.source_manifests[source.label] = manifest
            indexes.append(index)
        self.manifest = next(iter(self.source_manifests.values()))
        """The (first) source's manifest."""
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch_size, self.sampler, self.num_instances = global_batch_size, sampler, num_instances
        self.drop_last = drop_last
        # Identity namespaces stay apart; labelled sources first, so their identities are the ID classes.
        ids = [int(m["num_train_ids"]) for m in self.source_manifests.values()]
        pid_offset, self.num_id_classes = identity_offsets(
            ids, [has_identities(m) for m in self.source_manifests.values()])
        self.num_train_ids = sum(ids)
        self.skipped = 0
        # Sample s is caption sample_caption[s] of record sample_record[s] of source sample_source[s], in
        # source then record order.
        counts = [index.num_captions for index in indexes]
        self.source_sizes = [int(c.sum()) for c in counts]
        self._sample_source = np.repeat(np.arange(len(indexes)), self.source_sizes)
        self._sample_record = np.concatenate([np.repeat(np.arange(len(c)), c) for c in counts])
        self._sample_caption = np.concatenate([np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
                                               for c in counts])
        self._sample_pid = np.concatenate([index.pid[np.repeat(np.arange(len(c)), c)] + offset
                                           for index, c, offset in zip(indexes, counts, pid_offset)])
        self.num_samples = len(self._sample_record)
        self.source_names = list(self.source_manifests)
        self.source_weights = [float(source.weight) for source in sources]
        # Build the BPE tables once here so forked workers inherit them instead of each rebuilding them.
        default_tokenizer()
        self._batches = _RankBatchSampler(self._sample_pid, seed=seed, global_batch_size=global_batch_size,
                                          sampler=sampler, num_instances=num_instances, drop_last=drop_last,
                                          rank=rank, world_size=world_size,
                                          mixture=(self.source_sizes, self.source_weights) if mixture
                                          else None)
        dataset = _TrainDataset(indexes, self._sample_source, self._sample_record, self._sample_caption,
                                pid_offset, seed=seed, image_size=image_size, image_aug=image_aug, mlm=mlm)
        self._loader = DataLoader(dataset, batch_sampler=self._batches, num_workers=num_workers,
                                  collate_fn=_TrainCollate(image_size, mlm, mask_global_text),
                                  pin_memory=pin_memory, persistent_workers=num_workers > 0,
                                  prefetch_factor=prefetch_factor if num_workers > 0 else None)
        self.start_batch = 0

    @property
    def epoch(self) -> int:
        return self._batches.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (1-based) that the next iteration yields."""
        if epoch < 1:
            raise ValueError(f"epochs are 1-based, got {epoch}")
        self._batches.epoch = epoch

    def source_counts(self, epoch: int | None = None) -> dict[str, int]:
        """Samples each source gives an epoch (all ranks), by source name."""
        order, _ = self._batches.plan(self.epoch if epoch is None else epoch)
        counts = np.bincount(self._sample_source[order], minlength=len(self.source_names))
        return dict(zip(self.source_names, counts.tolist()))

    def num_batches(self, epoch: int) -> int:
        """Number of global batches in `epoch` (the identity sampler's count varies by epoch)."""
        return len(self._batches.plan(epoch)[1])

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """The sample indices of every global batch of an epoch (all ranks), without loading anything.

        Args:
            epoch: 1-based epoch; the current one when None.
        """
        order, bounds = self._batches.plan(self.epoch if epoch is None else epoch)
        return [order[a:b] for a, b in bounds]

    def __len__(self) -> int:
        """Number of global batches (optimizer micro-steps) in the current epoch, ignoring start_batch."""
        return len(self._batches.plan(self.epoch)[1])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._batches.start_batch, self.start_batch = self.start_batch, 0
        for batch in self._loader:
            if "fatal" in batch:
                raise ShardError(batch["fatal"])
            self.skipped += batch.pop("num_skipped")
            yield batch


def _identity_order(sample_pid: np.ndarray, k: int, p: int, rng: np.random.Generator) -> np.ndarray:
    """The official RandomIdentitySampler's epoch order, drawn from `rng`.

    Each identity's captions are shuffled (a pid with fewer than K captions draws K with replacement) and
    cut into groups of K (a remainder is dropped); then, while at least P identities have groups left, P of
    them are drawn without replacement and each gives its next group. The result is a multiple of P x K.
    """
    n = len(sample_pid)
    # Shuffle within each pid at once: sort by (pid, random key).
    grouped = np.lexsort((rng.random(n), sample_pid))
    pids, starts, counts = np.unique(sample_pid[grouped], return_index=True, return_counts=True)
    groups: list[list[np.ndarray]] = []
    for start, count in zip(starts.tolist(), counts.tolist()):
        members = grouped[start:start + count]
        if count < k:
            members = members[rng.integers(0, count, size=k)]
        usable = (len(members) // k) * k
        groups.append(list(members[:usable].reshape(-1, k)))
    next_group = [0] * len(pids)
    available = list(range(len(pids)))
    chosen: list[np.ndarray] = []
    while len(available) >= p:
        picks = rng.choice(len(available), size=p, replace=False)
        exhausted = set()
        for pick in picks.tolist():
            pid = available[pick]
            chosen.append(groups[pid][next_group[pid]])
            next_group[pid] += 1
            if next_group[pid] == len(groups[pid]):
                exhausted.add(pick)
        if exhausted:
            available = [a for i, a in enumerate(available) if i not in exhausted]
    return np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# Evaluation


class _GalleryDataset(Dataset):
    def __init__(self, index: SplitIndex, image_size: tuple[int, int]) -> None:
        self.reader = RecordReader(index)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.reader.index)

    def __getitem__(self, record: int) -> dict[str, Any] | None:
        index = self.reader.index
        try:
            image = decode_image(self.reader.read(record)[0])
        except ShardError as err:
            return {"fatal": str(err)}
        except _READ_ERRORS as err:
            _warn_skip(f"{index.split} gallery image {record} is unreadable: {err}")
            return None
        return {"images": test_transform(image, self.image_size), "pids": int(index.pid[record]),
                "index": record}


class _QueryDataset(Dataset):
    def __init__(self, index: SplitIndex) -> None:
        self.reader = RecordReader(index)
        counts = index.num_captions
        self.record = np.repeat(np.arange(len(index)), counts)
        self.caption = np.arange(len(self.record)) - np.repeat(np.cumsum(counts) - counts, counts)

    def __len__(self) -> int:
        return len(self.record)

    def __getitem__(self, query: int) -> dict[str, Any] | None:
        record = int(self.record[query])
        try:
            caption = self.reader.read_json(record)["captions"][int(self.caption[query])]
        except ShardError as err:
            return {"fatal": str(err)}
        except _READ_ERRORS as err:
            _warn_skip(f"{self.reader.index.split} query {query} (record {record}) is unreadable: {err}")
            return None
        return {"caption_ids": tokenize(caption), "pids": int(self.reader.index.pid[record]), "index": query}


class _EvalCollate:
    def __init__(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.key, self.shape, self.dtype = key, shape, dtype

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        if (fatal := _fatal(items)) is not None:
            return {"fatal": fatal}
        good = [item for item in items if item is not None]
        n = len(good)
        return {self.key: _stack(good, self.key, (n, *self.shape), self.dtype),
                "pids": _stack(good, "pids", (n,), torch.int64),
                "index": _stack(good, "index", (n,), torch.int64),
                "num_skipped": len(items) - n}


class EvalLoader:
    """This rank's contiguous part of a gallery or query list, in stable order.

    Attributes:
        num_items: gallery images or queries in the whole split (all ranks).
        part: this rank's ``[lo, hi)`` range of item positions (the ``index`` entries it yields).
        skipped: unreadable items skipped so far by this rank.
    """

    def __init__(self, dataset: Dataset, collate: _EvalCollate, *, rank: int, world_size: int,
                 batch_size: int, num_workers: int, pin_memory: bool) -> None:
        self.num_items = len(dataset)
        self.part = _rank_slice(self.num_items, rank, world_size)
        lo, hi = self.part
        batches = [list(range(a, min(hi, a + batch_size))) for a in range(lo, hi, batch_size)]
        self._loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate,
                                  pin_memory=pin_memory, persistent_workers=num_workers > 0)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self._loader:
            if "fatal" in batch:
                raise ShardError(batch["fatal"])
            self.skipped += batch.pop("num_skipped")
            yield batch


def build_eval_loaders(shards_dir: str | os.PathLike, split: str = "test", *, rank: int = 0,
                       world_size: int = 1, batch_size: int = 512, num_workers: int = 0,
                       image_size: tuple[int, int] = (384, 128), verify: VerifyMode = True,
                       pin_memory: bool = False, cache_dir: str | os.PathLike | None = None,
                       cache_max_gb: float | None = None) -> tuple[EvalLoader, EvalLoader]:
    """Gallery and query loaders of an evaluation split (IRRA_SPEC 3.1, 5): this rank's contiguous part.

    Gallery batches hold ``images [b,3,H,W]``, ``pids [b]``, ``index [b]`` (gallery position); query batches
    ``caption_ids [b,77]``, ``pids [b]``, ``index [b]`` (query position). The gallery is each image of the
    split once, the queries every caption; gather the parts over ranks and sort by ``index``.

    Args:
        shards_dir: folder with manifest.json.
        split: ``"test"`` or ``"val"``.
        rank: this process's index.
        world_size: number of processes.
        batch_size: items per batch (per rank).
        num_workers: DataLoader worker processes per loader.
        image_size: ``(height, width)``.
        verify: shard check, see :func:`irra_dist.data.shards.load_manifest`.
        pin_memory: pin batches for faster host-to-GPU copies.
        cache_dir: local cache of a remote set's shards.
        cache_max_gb: size cap of that cache (None: none).

    Returns:
        ``(gallery_loader, query_loader)``.

    Raises:
        ShardError: missing or mismatching shards, an unknown split, or pre-resized images of another size.
    """
    _check_rank(rank, world_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    manifest, index = open_split(shards_dir, split, verify=verify, cache_dir=cache_dir,
                                 cache_max_gb=cache_max_gb)
    size = _check_image_size(manifest, image_size, shards_dir)
    common = {"rank": rank, "world_size": world_size, "batch_size": batch_size, "num_workers": num_workers,
              "pin_memory": pin_memory}
    default_tokenizer()
    gallery = EvalLoader(_GalleryDataset(index, size), _EvalCollate("images", (3, *size), torch.float32),
                         **common)
    queries = EvalLoader(_QueryDataset(index), _EvalCollate("caption_ids", (CONTEXT_LENGTH,), torch.int64),
                         **common)
    return gallery, queries
