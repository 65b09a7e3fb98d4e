"""Mixture draws: shares by weight (hand-computed), with replacement where asked, deterministic per epoch."""

from __future__ import annotations

import numpy as np
import pytest

from irra_dist.data.mixture import draw_epoch, source_quotas


def test_quotas_follow_the_weights_and_add_up() -> None:
    # 100 + 50 samples, weights 1:2 -> 150 * (1/3, 2/3) = 50, 100.
    assert source_quotas([100, 50], [1.0, 2.0]).tolist() == [50, 100]
    # 10 + 10 + 10 with equal weights: exact thirds.
    assert source_quotas([10, 10, 10], [1, 1, 1]).tolist() == [10, 10, 10]
    # 7 samples, weights 1:1 -> 3.5 each; the tie goes to the first source.
    assert source_quotas([4, 3], [1, 1]).tolist() == [4, 3]
    # A zero weight drops a source.
    assert source_quotas([5, 5], [0, 1]).tolist() == [0, 10]
    for bad in ([-1, 1], [0, 0], [float("nan"), 1]):
        with pytest.raises(ValueError):
            source_quotas([5, 5], bad)


def test_draw_with_and_without_replacement() -> None:
    sizes, weights = [100, 50], [1.0, 2.0]
    drawn = draw_epoch(sizes, weights, seed=1, epoch=1)
    first, second = drawn[drawn < 100], drawn[drawn >= 100] - 100
    # Source 0 asked for 50 of its 100: a subset without repeats.
    assert len(first) == 50 and len(set(first.tolist())) == 50
    # Source 1 asked for 100 of its 50: two whole passes, every sample exactly twice.
    assert len(second) == 100 and np.bincount(second, minlength=50).tolist() == [2] * 50


def test_uneven_replacement_repeats_as_evenly_as_possible() -> None:
    drawn = draw_epoch([10, 4], [0.0, 1.0], seed=3, epoch=2) - 10  # 14 draws from 4 samples
    counts = np.bincount(drawn, minlength=4)
    assert counts.sum() == 14 and counts.max() - counts.min() <= 1


def test_deterministic_per_seed_and_epoch() -> None:
    a = draw_epoch([30, 20], [1, 3], seed=7, epoch=1)
    assert np.array_equal(a, draw_epoch([30, 20], [1, 3], seed=7, epoch=1))
    assert not np.array_equal(a, draw_epoch([30, 20], [1, 3], seed=7, epoch=2))
    assert not np.array_equal(a, draw_epoch([30, 20], [1, 3], seed=8, epoch=1))
