"""Mixtures of training sources: how many samples each source gives an epoch, and which ones.

Sources are concatenated into one sample space (source s owns global samples ``[offset_s, offset_s + n_s)``)
and one identity space (:func:`identity_offsets`: each source's pids are shifted past the other sources'
identities, so identities of different sources never merge; the sources with identity labels come first, so
the ID classifier's classes are exactly their identities and the per-image identities of sources without
labels, after them, are left out of the ID loss). An epoch has as many samples as all sources together; source
s gets the share ``w_s / sum(w)`` of them (largest-remainder rounding, so the shares add up exactly). A
source asked for more samples than it holds is drawn with replacement, as whole shuffled passes over it plus
a shuffled part of one more pass, so every sample repeats as evenly as possible; one asked for fewer gives a
random subset. Everything follows from (seed, epoch), so the draw is the same on every rank and for every
number of ranks; the sampler then orders the drawn samples as it would a single source.

In stream mode (``data.mode: stream``) samples are not addressable, so the draw is of sources, not samples:
:func:`epoch_source_labels` gives every position of the epoch's global sample sequence the source it is read
from, with the same largest-remainder shares, shuffled from (seed, epoch); each stream takes the next sample
of that source's own resampled shard stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

_STREAM_MIXTURE = 3  # beside the pipeline's order / image / MLM seed streams


@dataclass(frozen=True)
class TrainSource:
    """One shard set of a training mixture."""

    location: str | os.PathLike
    """Folder, http(s):// URL or pipe: command of the shard set."""
    weight: float = 1.0
    """Relative share of each epoch."""
    name: str = ""
    """Name in logs (default: the location's last path component)."""

    @property
    def label(self) -> str:
        return self.name or str(self.location).rstrip("/").rsplit("/", 1)[-1] or str(self.location)


def has_identities(manifest: dict) -> bool:
    """Whether a shard set's pids name people (False: built without pids, every image its own identity)."""
    return manifest.get("identities", "given") != "per_image"


def identity_offsets(num_ids: list[int], labelled: list[bool]) -> tuple[list[int], int]:
    """Where each source's identities start in the mixture's identity space, and how many of those are
    ID-classifier classes: the labelled sources' identities, in source order, then the others'.

    Args:
        num_ids: train identities of each source (its manifest's ``num_train_ids``).
        labelled: whether each source has identity labels (:func:`has_identities`).

    Returns:
        ``(offsets, num_classes)``: source s's pid p becomes ``p + offsets[s]``; pids below `num_classes`
        are classes.
    """
    order = sorted(range(len(num_ids)), key=lambda s: not labelled[s])  # stable: source order kept
    offsets = [0] * len(num_ids)
    start = 0
    for s in order:
        offsets[s], start = start, start + num_ids[s]
    return offsets, sum(n for n, has in zip(num_ids, labelled) if has)


def source_quotas(sizes: list[int], weights: list[float]) -> np.ndarray:
    """Samples per source in one epoch: ``sum(sizes)`` shared in proportion to `weights`.

    Raises:
        ValueError: no sources, a negative or all-zero weight, or a source without samples.
    """
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    if len(sizes_arr) != len(weights):
        raise ValueError(f"need one weight per source, got {len(sizes_arr)} sources and {len(weights)} "
                         "weights")
    if (sizes_arr <= 0).any():
        raise ValueError(f"every source needs training samples, got sizes {list(sizes)}")
    return split_by_weight(int(sizes_arr.sum()), weights)


def split_by_weight(total: int, weights: list[float]) -> np.ndarray:
    """`total` shared in proportion to `weights` by largest remainder (the parts add up to `total` exactly).

    Raises:
        ValueError: no weights, or a negative, non-finite or all-zero weight.
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0:
        raise ValueError("need at least one source")
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"source weights must be finite, >= 0 and not all 0, got {list(weights)}")
    exact = w / w.sum() * total
    quotas = np.floor(exact).astype(np.int64)
    # Largest remainder; ties go to the earlier source, so the result is deterministic.
    order = np.lexsort((np.arange(len(w)), -(exact - quotas)))
    quotas[order[: total - int(quotas.sum())]] += 1
    return quotas


def draw_epoch(sizes: list[int], weights: list[float], seed: int, epoch: int) -> np.ndarray:
    """The global sample ids of one epoch of the mixture, grouped by source (the sampler shuffles them).

    Args:
        sizes: training samples (captions) per source.
        weights: relative share of each source in an epoch.
        seed: run seed.
        epoch: 1-based epoch.
    """
    from irra_dist.data.pipeline import derive_seed

    quotas = source_quotas(sizes, weights)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    parts = []
    for s, (size, quota, offset) in enumerate(zip(sizes, quotas.tolist(), offsets.tolist())):
        rng = np.random.Generator(np.random.PCG64(derive_seed(seed, epoch, _STREAM_MIXTURE, s)))
        passes, rest = divmod(quota, size)
        picks = [rng.permutation(size) for _ in range(passes)]
        picks.append(rng.permutation(size)[:rest])
        parts.append(np.concatenate(picks) + offset)
    return np.concatenate(parts)


def epoch_source_labels(total: int, weights: list[float], seed: int, epoch: int) -> np.ndarray:
    """Stream mode: the source of each of the epoch's `total` global sample positions.

    Source s labels ``split_by_weight(total, weights)[s]`` positions, shuffled from (seed, epoch), so the
    shares are exact for the epoch and the same for every number of ranks and workers.
    """
    from irra_dist.data.pipeline import derive_seed

    quotas = split_by_weight(total, weights)
    labels = np.repeat(np.arange(len(quotas), dtype=np.int16), quotas)
    return np.random.Generator(np.random.PCG64(derive_seed(seed, epoch, _STREAM_MIXTURE))).permutation(labels)
