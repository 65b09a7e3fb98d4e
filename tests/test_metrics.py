"""retrieval_metrics against a naive full-sort implementation of the official formulas (IRRA_SPEC 5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from irra_dist.evaluation import RetrievalInputError, format_metrics_table, retrieval_metrics


def naive_metrics(q: torch.Tensor, g: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor) -> dict:
    """The official rank(): full similarity, full (stable) argsort, match matrix and cumsums, in float64."""
    sim = F.normalize(q.double(), dim=1) @ F.normalize(g.double(), dim=1).T
    order = torch.argsort(sim, dim=1, descending=True, stable=True)
    matches = (g_pids[order] == q_pids[:, None]).long()
    cmc = matches[:, :10].cumsum(1).clamp(max=1).double().mean(0) * 100
    num_rel = matches.sum(1)
    hits = matches.cumsum(1)
    positions = torch.arange(1, g.shape[0] + 1, dtype=torch.float64)
    ap = ((hits / positions) * matches).sum(1) / num_rel
    last = torch.stack([row.nonzero()[-1, 0] for row in matches])
    inp = hits[torch.arange(len(last)), last] / (last + 1.0)
    at = [cmc[min(k, len(cmc)) - 1].item() for k in (1, 5, 10)]  # a gallery shorter than K: R@K = R@G
    return {"R1": at[0], "R5": at[1], "R10": at[2],
            "mAP": ap.mean().item() * 100, "mINP": inp.mean().item() * 100}


def assert_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-4), key


def random_problem(seed: int, num_ids: int = 12, num_gallery: int = 60, num_queries: int = 45, dim: int = 16,
                   dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(seed)
    g_pids = torch.randint(0, num_ids, (num_gallery,), generator=gen)
    g_pids[:num_ids] = torch.arange(num_ids)  # every id has at least one gallery item
    q_pids = torch.randint(0, num_ids, (num_queries,), generator=gen)
    centres = torch.randn(num_ids, dim, generator=gen, dtype=dtype)
    # Features near their id's centre, so rankings are neither trivial nor random.
    g = centres[g_pids] + 1.5 * torch.randn(num_gallery, dim, generator=gen, dtype=dtype)
    q = centres[q_pids] + 1.5 * torch.randn(num_queries, dim, generator=gen, dtype=dtype)
    return q, g, q_pids, g_pids


def test_hand_computed_toy() -> None:
    # Positives of pid 7 land at ranks 1 and 3: AP = (1/1 + 2/3) / 2, INP = 2/3.
    q = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.5, 0.5], [0.0, 1.0]])
    got = retrieval_metrics(q, g, torch.tensor([7]), torch.tensor([7, 3, 7, 3]))
    want = {"R1": 100.0, "R5": 100.0, "R10": 100.0, "mAP": 100 * (1 + 2 / 3) / 2, "mINP": 100 * 2 / 3}
    assert_close(got, want)
    assert_close(naive_metrics(q, g, torch.tensor([7]), torch.tensor([7, 3, 7, 3])), want)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_naive_random(seed: int, chunk_size: int) -> None:
    q, g, q_pids, g_pids = random_problem(seed)
    got = retrieval_metrics(q, g, q_pids, g_pids, chunk_size=chunk_size)
    want = naive_metrics(q, g, q_pids, g_pids)
    assert_close(got, want)
    assert 0 < got["mAP"] < 100 and 0 < got["R1"] < got["R10"] < 100  # a non-degenerate case


def test_many_positives_and_large_gallery() -> None:
    q, g, q_pids, g_pids = random_problem(3, num_ids=4, num_gallery=300, num_queries=30, dim=8)
    assert_close(retrieval_metrics(q, g, q_pids, g_pids, chunk_size=8), naive_metrics(q, g, q_pids, g_pids))


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_ties_follow_stable_descending_order(chunk_size: int) -> None:
    # +-1 entries in 16 dimensions normalise to +-0.25 exactly, so dot products are exact and tie often.
    gen = torch.Generator().manual_seed(5)
    g = torch.randint(0, 2, (80, 16), generator=gen).float() * 2 - 1
    q = torch.randint(0, 2, (40, 16), generator=gen).float() * 2 - 1
    g[40:] = g[:40]  # duplicated gallery rows: guaranteed ties between different pids
    g_pids = torch.randint(0, 10, (80,), generator=gen)
    g_pids[:10] = torch.arange(10)
    q_pids = torch.randint(0, 10, (40,), generator=gen)
    sim = F.normalize(q, dim=1) @ F.normalize(g, dim=1).T
    assert (sim.unsqueeze(2) == sim.unsqueeze(1)).sum() > 40 * 80 * 2  # the data really has ties
    assert_close(retrieval_metrics(q, g, q_pids, g_pids, chunk_size=chunk_size),
                 naive_metrics(q, g, q_pids, g_pids))


def test_tie_broken_by_gallery_index() -> None:
    q = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # Positive after its tied negative: rank 2. Positive first: rank 1.
    behind = retrieval_metrics(q, g, torch.tensor([1]), torch.tensor([0, 1, 2]))
    ahead = retrieval_metrics(q, g, torch.tensor([0]), torch.tensor([0, 1, 2]))
    assert behind["R1"] == 0.0 and behind["mAP"] == pytest.approx(50.0)
    assert ahead["R1"] == 100.0 and ahead["mAP"] == pytest.approx(100.0)


def test_image_to_text_is_the_swapped_call() -> None:
    q, g, q_pids, g_pids = random_problem(7, num_queries=60, num_gallery=45)
    g_pids[:12] = torch.arange(12)
    q_pids[:12] = torch.arange(12)
    assert_close(retrieval_metrics(g, q, g_pids, q_pids, chunk_size=4), naive_metrics(g, q, g_pids, q_pids))


def test_float32_and_max_rank() -> None:
    q, g, q_pids, g_pids = random_problem(2, dtype=torch.float32)
    got = retrieval_metrics(q, g, q_pids.int(), g_pids.int(), chunk_size=16, max_rank=20)
    assert list(got) == ["R1", "R5", "R10", "R20", "mAP", "mINP"]
    want = naive_metrics(q, g, q_pids, g_pids)
    sim = F.normalize(q.double(), dim=1) @ F.normalize(g.double(), dim=1).T
    order = torch.argsort(sim, dim=1, descending=True, stable=True)
    first = (g_pids[order] == q_pids[:, None]).long().argmax(1)
    want["R20"] = (first < 20).double().mean().item() * 100
    assert_close(got, want)
    assert list(retrieval_metrics(q, g, q_pids, g_pids, max_rank=3)) == ["R1", "R3", "mAP", "mINP"]


def test_query_without_positive_is_an_error() -> None:
    q, g, q_pids, g_pids = random_problem(0)
    q_pids[3] = 99
    with pytest.raises(RetrievalInputError, match="pid 99"):
        retrieval_metrics(q, g, q_pids, g_pids)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"gallery_feats": torch.zeros(5, 3)}, "same D"),
        ({"query_pids": torch.zeros(4)}, "integer tensor"),
        ({"gallery_pids": torch.zeros(3, dtype=torch.long)}, r"shape \[5\]"),
        ({"chunk_size": 0}, ">= 1"),
        ({"query_feats": torch.full((4, 2), float("nan"))}, "NaN"),
    ],
)
def test_bad_input_is_one_clear_error(kwargs: dict, pattern: str) -> None:
    args = {"query_feats": torch.randn(4, 2), "gallery_feats": torch.randn(5, 2),
            "query_pids": torch.zeros(4, dtype=torch.long), "gallery_pids": torch.zeros(5, dtype=torch.long)}
    args.update(kwargs)
    chunk = {"chunk_size": args.pop("chunk_size")} if "chunk_size" in args else {}
    with pytest.raises(RetrievalInputError, match=pattern):
        retrieval_metrics(**args, **chunk)


def test_format_metrics_table_layout() -> None:
    rows = {"t2i": {"R1": 73.38, "R5": 89.93, "R10": 93.71, "mAP": 66.13, "mINP": 50.24},
            "i2t": {"R1": 5.0, "R5": 100.0, "R10": 100.0, "mAP": 1.2344, "mINP": 0.0}}
    want = "\n".join([
        "+------+--------+---------+---------+--------+--------+",
        "| task |   R1   |    R5   |   R10   |  mAP   |  mINP  |",
        "+------+--------+---------+---------+--------+--------+",
        "| t2i  | 73.380 |  89.930 |  93.710 | 66.130 | 50.240 |",
        "| i2t  | 5.000  | 100.000 | 100.000 | 1.234  | 0.000  |",
        "+------+--------+---------+---------+--------+--------+",
    ])
    assert format_metrics_table(rows) == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_naive() -> None:
    q, g, q_pids, g_pids = random_problem(4, num_gallery=200, num_queries=150)
    assert_close(retrieval_metrics(q, g, q_pids, g_pids, chunk_size=32, device="cuda"),
                 naive_metrics(q, g, q_pids, g_pids))
