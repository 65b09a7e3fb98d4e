"""Mixture draws: shares by weight (hand-computed), with replacement where asked, deterministic per epoch."""

from __future__ import annotations

import math

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


# --------------------------------------------------------------------------------------------------
# The mixture inside the training loader


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory):
    """Two independently generated shard sets (different populations, different sizes) and their parses."""
    from irra_dist.data.parsers import parse_dataset
    from irra_dist.data.shards import build_shards
    from irra_dist.synthetic.dataset import generate_synthetic_dataset

    out = []
    for name, ids, seed in (("a", 5, 11), ("b", 3, 12)):
        root = tmp_path_factory.mktemp(f"data_{name}")
        generate_synthetic_dataset(root / "CUHK-PEDES", num_train_ids=ids, num_val_ids=1, num_test_ids=2,
                                   images_per_id=(1, 2), captions_per_image=2, seed=seed)
        parsed = parse_dataset("CUHK-PEDES", root)
        shards = tmp_path_factory.mktemp(f"shards_{name}")
        build_shards(parsed, None, shards, shard_size=3, workers=1)
        out.append((shards, parsed))
    return out


def _mixture_loader(two_sources, weights=(1.0, 3.0), **kwargs):
    from irra_dist.data.mixture import TrainSource
    from irra_dist.data.pipeline import TrainLoader

    sources = [TrainSource(shards, w, name) for (shards, _), w, name in zip(two_sources, weights, "ab")]
    kwargs.setdefault("image_size", (64, 32))
    return TrainLoader(sources, **kwargs)


def test_mixture_samples_keep_each_source_text_and_a_separate_identity_space(two_sources) -> None:
    import torch

    from irra_dist.tokenizer import tokenize

    (_, parsed_a), (_, parsed_b) = two_sources
    loader = _mixture_loader(two_sources, global_batch_size=5, mlm=False, image_aug=False)
    # The classifier spans both sources' train ids; b's pids come after a's.
    assert loader.num_train_ids == parsed_a.num_train_ids + parsed_b.num_train_ids
    # Independent reference: global sample s is a's s-th train caption, or b's (s - n_a)-th, pid shifted.
    expected = [(pid, text) for pid, _, _, text in parsed_a.train_samples()]
    expected += [(pid + parsed_a.num_train_ids, text) for pid, _, _, text in parsed_b.train_samples()]
    loader.set_epoch(1)
    batches = list(loader)
    seen = torch.cat([b["sample_index"] for b in batches]).tolist()
    pids = torch.cat([b["pids"] for b in batches]).tolist()
    texts = torch.cat([b["caption_ids"] for b in batches])
    assert len(seen) == len(expected)  # an epoch has as many samples as the sources together
    for row, (sample, pid) in enumerate(zip(seen, pids)):
        assert pid == expected[sample][0]
        assert torch.equal(texts[row], tokenize(expected[sample][1]))
    # Shares follow the weights 1:3 of the total, b drawn with replacement (it holds fewer). With two
    # sources the leftover sample goes to a when a's fractional part is at least a half (ties to the first).
    counts = loader.source_counts(1)
    n = len(expected)
    share_a = int(np.floor(n / 4 + 0.5))
    assert counts == {"a": share_a, "b": n - share_a}
    assert np.bincount(np.asarray(seen), minlength=n)[: len(parsed_a.train_samples())].max() == 1


def test_mixture_global_batches_are_identical_for_one_and_two_ranks(two_sources) -> None:
    """1 x 2B == 2 x B: the same samples, pixels, masks and pids, whatever the process count."""
    import torch

    single = _mixture_loader(two_sources, global_batch_size=6, num_workers=0)
    ranks = [_mixture_loader(two_sources, global_batch_size=6, rank=r, world_size=2, num_workers=1)
             for r in range(2)]
    for epoch in (1, 2):
        single.set_epoch(epoch)
        for r in ranks:
            r.set_epoch(epoch)
        whole = list(single)
        halves = [list(r) for r in ranks]
        assert len(whole) == len(halves[0]) == len(halves[1])
        for g, batch in enumerate(whole):
            # caption_ids: the masked captions (data.mask_global_text, the default)
            for key in ("images", "caption_ids", "pids", "sample_index", "mlm_labels"):
                joined = torch.cat([halves[0][g][key], halves[1][g][key]])
                assert torch.equal(batch[key], joined), (epoch, g, key)
    # Epochs draw differently; the same (seed, epoch) draws the same.
    assert not np.array_equal(single.global_batches(1)[0], single.global_batches(2)[0])
    again = _mixture_loader(two_sources, global_batch_size=6)
    assert all(np.array_equal(x, y) for x, y in zip(again.global_batches(2), single.global_batches(2)))


def test_two_source_mixture_trains_one_classifier_over_both_and_evaluates_the_named_source(
        two_sources, tiny_shards, tiny_recipe, fresh_accelerate) -> None:
    from conftest import TINY_TRAIN_IDS
    from safetensors.torch import load_file

    from irra_dist.config import load_config
    from irra_dist.engine.runlog import read_metrics
    from irra_dist.engine.trainer import train

    (second, parsed), _ = two_sources
    overrides = [f"data.sources=[{{shards: {tiny_shards}, weight: 1, name: tiny}}, "
                 f"{{shards: {second}, weight: 2, name: small}}]", "eval.source=small", "train.run_name=mix"]
    run = train(load_config(tiny_recipe, overrides))
    weights = load_file(run / "model.safetensors")
    assert weights["classifier.weight"].shape[0] == TINY_TRAIN_IDS + parsed.num_train_ids
    rows = read_metrics(run / "metrics.jsonl")
    header = next(r for r in rows if r["kind"] == "run")
    assert header["shards"] == str(second) and [s["name"] for s in header["sources"]] == ["tiny", "small"]
    shares = next(r for r in rows if r["kind"] == "sources")["samples"]
    total = TINY_TRAIN_IDS * 5 + len(parsed.train_samples())
    assert sum(shares.values()) == total and shares["small"] == round(total * 2 / 3)
    assert "epoch 1 draws" in (run / "train_log.txt").read_text()
    # Evaluated on the named source's test split: irra-eval of the final weights on that set (and the run's
    # default set, which must be the same one) gives the metrics the run recorded.
    from conftest import reset_accelerate

    from irra_dist.engine.evaluate import evaluate_on_sets

    recorded = [r for r in rows if r["kind"] == "eval"][-1]["metrics"]["t2i"]
    reset_accelerate()
    for sets in ([str(second)], None):
        result = evaluate_on_sets(run, sets, weights="last", num_workers=0)[0]
        assert result["shards"] == str(second)
        assert result["metrics"]["t2i"] == pytest.approx(recorded, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# The mixture in stream mode


def _stream_mixture(two_sources, weights=(1.0, 3.0), **kwargs):
    from irra_dist.data.mixture import TrainSource
    from irra_dist.data.streaming import StreamTrainLoader

    sources = [TrainSource(shards, w, name) for (shards, _), w, name in zip(two_sources, weights, "ab")]
    return StreamTrainLoader(sources, image_size=(64, 32), shuffle_buffer=4, **kwargs)


def _drawn_sources(batches, num_a: int) -> list[str]:
    """The source of each sample, read off its pid (b's pids come after a's train ids)."""
    import torch

    return ["a" if pid < num_a else "b" for pid in torch.cat([b["pids"] for b in batches]).tolist()]


def test_stream_mixture_shares_by_weight_with_each_source_text_and_identities(two_sources) -> None:
    from irra_dist.tokenizer import tokenize

    (_, parsed_a), (_, parsed_b) = two_sources
    num_a = parsed_a.num_train_ids
    # Independent reference: which global pids each caption text may carry (a's own, b's shifted by a's ids).
    allowed: dict[tuple, set[int]] = {}
    for parsed, offset in ((parsed_a, 0), (parsed_b, num_a)):
        for pid, _, _, text in parsed.train_samples():
            allowed.setdefault(tuple(tokenize(text).tolist()), set()).add(pid + offset)
    total = len(parsed_a.train_samples()) + len(parsed_b.train_samples())
    # Weights 1:3 of the epoch's samples; with two sources the leftover goes to a when a's fractional part is
    # at least a half (ties to the first source).
    share_a = int(np.floor(total / 4 + 0.5))
    expected = {"a": share_a, "b": total - share_a}

    loader = _stream_mixture(two_sources, global_batch_size=5, mlm=False, image_aug=False)
    assert loader.num_train_ids == num_a + parsed_b.num_train_ids
    loader.set_epoch(1)
    batches = list(loader)
    assert sum(len(b["pids"]) for b in batches) == total
    for batch in batches:
        for ids, pid in zip(batch["caption_ids"].tolist(), batch["pids"].tolist()):
            assert pid in allowed[tuple(ids)]
    drawn = _drawn_sources(batches, num_a)
    assert {name: drawn.count(name) for name in "ab"} == expected == loader.source_counts(1)
    # b (3 of 4 shares, fewer samples than that) is read from its resampled shards more than once.
    assert drawn.count("b") > len(parsed_b.train_samples())

    # The shares do not depend on the number of workers or ranks.
    for kwargs in ({"num_workers": 2}, {"rank": 0, "world_size": 2}, {"rank": 1, "world_size": 2}):
        other = _stream_mixture(two_sources, global_batch_size=5, mlm=False, image_aug=False, **kwargs)
        other.set_epoch(1)
        assert other.source_counts(1) == expected
    ranks = [list(_stream_mixture(two_sources, global_batch_size=5, mlm=False, rank=r, world_size=2))
             for r in (0, 1)]
    both = _drawn_sources(ranks[0], num_a) + _drawn_sources(ranks[1], num_a)
    assert {name: both.count(name) for name in "ab"} == expected


def test_stream_mixture_resumes_mid_epoch_on_the_same_streams(two_sources) -> None:
    import torch

    loader = _stream_mixture(two_sources, global_batch_size=4, num_workers=2)
    loader.set_epoch(2)
    whole = list(loader)
    loader.set_epoch(2)
    loader.start_batch = 3
    resumed = list(loader)
    assert len(resumed) == len(whole) - 3
    for a, b in zip(whole[3:], resumed, strict=True):
        for key in ("images", "caption_ids", "pids", "mlm_labels"):
            assert torch.equal(a[key], b[key]), key


def test_stream_mixture_trains_one_classifier_over_both_sources(two_sources, tiny_shards, tiny_recipe,
                                                                fresh_accelerate) -> None:
    from conftest import TINY_TRAIN_IDS
    from safetensors.torch import load_file

    from irra_dist.config import load_config
    from irra_dist.engine.runlog import read_metrics
    from irra_dist.engine.trainer import train

    (second, parsed), _ = two_sources
    overrides = [f"data.sources=[{{shards: {tiny_shards}, weight: 1, name: tiny}}, "
                 f"{{shards: {second}, weight: 2, name: small}}]", "eval.source=small", "data.mode=stream",
                 "data.shuffle_buffer=8", "train.max_steps=2", "train.run_name=stream_mix"]
    run = train(load_config(tiny_recipe, overrides))
    weights = load_file(run / "model.safetensors")
    assert weights["classifier.weight"].shape[0] == TINY_TRAIN_IDS + parsed.num_train_ids
    shares = next(r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "sources")["samples"]
    total = TINY_TRAIN_IDS * 5 + len(parsed.train_samples())
    assert sum(shares.values()) == total and shares["small"] == round(total * 2 / 3)


# --------------------------------------------------------------------------------------------------
# A source without identities in a mixture


def test_identity_offsets_put_labelled_sources_first() -> None:
    from irra_dist.data.mixture import identity_offsets

    # Sources of 5 (no labels), 3 and 4 identities: the labelled ones take 0..2 and 3..6, the other 7..11.
    assert identity_offsets([5, 3, 4], [False, True, True]) == ([7, 0, 3], 7)
    assert identity_offsets([5, 3], [True, True]) == ([0, 5], 8)  # all labelled: source order, as before
    assert identity_offsets([6], [False]) == ([0], 0)


@pytest.fixture(scope="module")
def unlabelled_source(tmp_path_factory: pytest.TempPathFactory):
    """A shard set built from JSON lines without pids (every image its own identity): 6 images x 2
    captions, and each caption text."""
    import json

    from PIL import Image

    from irra_dist.engine.build_shards_cli import main as build_main

    root = tmp_path_factory.mktemp("unlabelled")
    lines = []
    for i in range(6):
        Image.new("RGB", (32, 64), (30 * i, 200 - 30 * i, 60)).save(root / f"img{i}.jpg")
        lines.append({"image": f"img{i}.jpg",
                      "captions": [f"unlabelled photo {i}", f"unlabelled picture {i}"]})
    (root / "corpus.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = root / "shards"
    assert build_main(["--dataset", "jsonl", "--ann", str(root / "corpus.jsonl"), "--images", str(root),
                       "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    return out, [c for line in lines for c in line["captions"]]


@pytest.mark.parametrize("mode", ["indexed", "stream"])
def test_labelled_identities_are_the_classes_whatever_the_source_order(two_sources, unlabelled_source,
                                                                       mode: str) -> None:
    from irra_dist.data.mixture import TrainSource
    from irra_dist.data.pipeline import TrainLoader
    from irra_dist.data.streaming import StreamTrainLoader
    from irra_dist.tokenizer import tokenize

    (labelled, parsed), _ = two_sources
    corpus, corpus_captions = unlabelled_source
    sources = [TrainSource(corpus, 1.0, "corpus"), TrainSource(labelled, 1.0, "people")]
    common = dict(global_batch_size=4, image_size=(64, 32), mlm=False, image_aug=False)
    loader = (TrainLoader(sources, **common) if mode == "indexed"
              else StreamTrainLoader(sources, shuffle_buffer=4, **common))
    assert loader.num_id_classes == parsed.num_train_ids
    assert loader.num_train_ids == parsed.num_train_ids + 6
    # Independent reference: the labelled set's captions keep their own pids (the classes 0..n-1); the
    # corpus's captions get identities after them.
    people = {tuple(tokenize(text).tolist()): pid for pid, _, _, text in parsed.train_samples()}
    corpus_ids = {tuple(tokenize(text).tolist()) for text in corpus_captions}
    loader.set_epoch(1)
    seen = {"people": 0, "corpus": 0}
    for batch in loader:
        for ids, pid in zip(batch["caption_ids"].tolist(), batch["pids"].tolist()):
            key = tuple(ids)
            if key in people:
                assert pid == people[key]
                seen["people"] += 1
            else:
                assert key in corpus_ids and parsed.num_train_ids <= pid < parsed.num_train_ids + 6
                seen["corpus"] += 1
    assert seen["people"] > 0 and seen["corpus"] > 0


def test_mixture_with_an_unlabelled_source_keeps_the_id_loss_for_the_labelled_one(
        unlabelled_source, tiny_shards, tiny_recipe, fresh_accelerate) -> None:
    from conftest import TINY_TRAIN_IDS
    from safetensors.torch import load_file

    from irra_dist.config import load_config
    from irra_dist.engine.runlog import read_metrics
    from irra_dist.engine.trainer import train

    corpus, _ = unlabelled_source
    overrides = [f"data.sources=[{{shards: {corpus}, weight: 1, name: corpus}}, "
                 f"{{shards: {tiny_shards}, weight: 1, name: tiny}}]", "eval.source=tiny",
                 "train.max_steps=3", "train.run_name=mix_unlabelled"]
    run = train(load_config(tiny_recipe, overrides))
    assert load_file(run / "model.safetensors")["classifier.weight"].shape[0] == TINY_TRAIN_IDS
    log = (run / "train_log.txt").read_text()
    assert f"the ID loss classifies the {TINY_TRAIN_IDS} identities of tiny and leaves its rows out" in log
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert rows and all(math.isfinite(r["id_loss"]) and r["id_loss"] > 0 for r in rows)
    assert "id" in load_config(run / "config.yaml").loss.names
