"""Exact retrieval metrics (R@K, mAP, mINP) computed chunk by chunk, without sorting the score matrix.

The official IRRA evaluation (IRRA_SPEC 5) builds the full query x gallery similarity matrix, argsorts
every row and takes cumulative sums over the sorted match matrix: about 21 bytes per pair, 8 GB for
ICFG-PEDES. Every metric it reports depends only on the *ranks of the positives* of each query, so here
each chunk of queries is scored against the gallery and the ranks of its positives are obtained by
bucketing every gallery item against the query's sorted positives (``torch.searchsorted``) and counting
(scatter-add + cumsum). Memory is bounded by ``chunk_size x gallery`` and the cost is
``O(Q G log P)`` for P positives per query instead of ``O(Q G log G)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

METRIC_COLUMNS = ("R1", "R5", "R10", "mAP", "mINP")
"""Column order of the official result table."""


class RetrievalInputError(ValueError):
    """Features or ids that cannot be evaluated; the message names the problem and the fix."""


def retrieval_metrics(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    query_pids: torch.Tensor,
    gallery_pids: torch.Tensor,
    *,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    max_rank: int = 10,
) -> dict[str, float]:
    """Rank the gallery for every query by cosine similarity and score the ranking.

    Definitions are those of the official ``rank()`` (IRRA_SPEC 5): every gallery item whose pid equals
    the query's pid is a positive; with ``r_1 < ... < r_n`` the 1-based ranks of a query's n positives,
    ``R@K = 100 * mean_q [r_1 <= K]``, ``AP = mean_t t / r_t``, ``INP = n / r_n``, and ``mAP`` / ``mINP``
    are their means over queries, in percent. For text-to-image pass the caption features as queries and
    the image features as gallery; image-to-text is the same call with the roles swapped.

    Ties: gallery items with equal scores are ordered by gallery index, i.e. the ranking equals
    ``torch.argsort(similarity, dim=1, descending=True, stable=True)``. The official code uses an
    unstable argsort, whose tie order is unspecified; without ties both agree exactly.

    Features are L2-normalised here and scored in float32 (as the official code does), or in float64
    when either input is float64.

    Args:
        query_feats: Query features ``[Q, D]`` (e.g. caption features for text-to-image).
        gallery_feats: Gallery features ``[G, D]``.
        query_pids: Person id of each query ``[Q]`` (any integer dtype).
        gallery_pids: Person id of each gallery item ``[G]``.
        chunk_size: Queries scored at a time; peak memory is about ``20 * chunk_size * G`` bytes.
        device: Where to compute (e.g. ``"cuda"``); defaults to the device of ``query_feats``.
        max_rank: Length of the CMC curve: the result has ``R1``, ``R5``, ``R10`` for those ``<= max_rank``
            and ``R{max_rank}``.

    Returns:
        ``{"R1", "R5", "R10", "mAP", "mINP"}`` (see ``max_rank``) as Python floats in percent.

    Raises:
        RetrievalInputError: On mismatched shapes, non-finite features, a bad ``chunk_size`` / ``max_rank``,
            or a query whose pid has no gallery item (its AP and INP would be undefined).
    """
    _check_inputs(query_feats, gallery_feats, query_pids, gallery_pids, chunk_size, max_rank)
    device = torch.device(device) if device is not None else query_feats.device
    wide = torch.promote_types(query_feats.dtype, gallery_feats.dtype) == torch.float64
    dtype = torch.float64 if wide else torch.float32
    num_queries, num_gallery = query_feats.shape[0], gallery_feats.shape[0]

    # Negated once, so that each chunk's product is already an ascending "best first" key.
    neg_gallery = F.normalize(gallery_feats.to(device=device, dtype=dtype), dim=1).neg_()
    query_pids = query_pids.to(device=device, dtype=torch.int64)
    gallery_pids = gallery_pids.to(device=device, dtype=torch.int64)

    # Gallery items grouped by pid (stable, so each group lists its items by ascending gallery index):
    # the positives of a query are one contiguous run of `by_pid`.
    sorted_pids, by_pid = torch.sort(gallery_pids, stable=True)
    unique_pids, counts = torch.unique_consecutive(sorted_pids, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    group = torch.searchsorted(unique_pids, query_pids).clamp_(max=unique_pids.numel() - 1)
    has_positive = unique_pids[group] == query_pids
    num_pos = torch.where(has_positive, counts[group], 0)
    # Host syncs: this one (validity and the padded positive count), then one per chunk.
    missing, max_pos = int((~has_positive).sum()), int(num_pos.max())
    if missing:
        first_bad = int(query_pids[~has_positive][0])
        raise RetrievalInputError(
            f"{missing} of {num_queries} queries have no gallery item with their pid (e.g. pid {first_bad}); "
            "their AP/INP are undefined: drop those queries or add their gallery items"
        )
    pos_start = starts[group]

    ks = sorted({k for k in (1, 5, 10) if k <= max_rank} | {max_rank})
    ks_tensor = torch.tensor(ks, device=device)
    cmc_hits = torch.zeros(len(ks), dtype=torch.float64, device=device)
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    inp_sum = torch.zeros((), dtype=torch.float64, device=device)
    # One more slot than the largest positive count: every query has a padded slot, so the bucket of an
    # item (at most its query's count) always indexes a slot.
    slot = torch.arange(max_pos + 1, device=device)

    for begin in range(0, num_queries, chunk_size):
        end = min(begin + chunk_size, num_queries)
        queries = F.normalize(query_feats[begin:end].to(device=device, dtype=dtype), dim=1)
        n = num_pos[begin:end]
        valid = slot < n[:, None]
        pos_cols = by_pid[(pos_start[begin:end, None] + slot).clamp_(max=num_gallery - 1)]
        ranks = _positive_ranks(queries @ neg_gallery.T, pos_cols, valid).to(torch.float64)

        cmc_hits += (ranks[:, :1] <= ks_tensor).sum(0)
        ap_sum += ((slot + 1) / ranks * valid).sum(1).div(n).sum()
        inp_sum += (n / ranks.gather(1, (n - 1)[:, None]).squeeze(1)).sum()

    scale = 100.0 / num_queries
    results = {f"R{k}": hit * scale for k, hit in zip(ks, cmc_hits.tolist(), strict=True)}
    results["mAP"] = ap_sum.item() * scale
    results["mINP"] = inp_sum.item() * scale
    return results


def _positive_ranks(order_key: torch.Tensor, pos_cols: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1-based ranks of each query's positives, in ranking order.

    Ranking order is ascending ``(order_key, gallery index)``. With the query's positives sorted in that
    order as ``p_0, p_1, ...``, a gallery item k is placed before exactly ``b_k`` of them (its bucket);
    the rank of ``p_t`` is the number of items (itself included) whose bucket is ``<= t``.

    Args:
        order_key: Negated scores ``[C, G]``, so that ascending order is best first.
        pos_cols: Gallery index of each positive ``[C, P]``, padded arbitrarily where ``valid`` is False.
        valid: Which of the ``P`` slots hold a real positive ``[C, P]``; real slots come first, and every
            row has at least one padded slot.

    Returns:
        Ranks ``[C, P]`` (int64) in increasing order; entries of padded slots are meaningless.
    """
    num_gallery = order_key.shape[1]
    # Padded slots go last: an infinite key after every real score, and an index past every real item.
    pos_key = order_key.gather(1, pos_cols).masked_fill_(~valid, float("inf"))
    pos_key, perm = torch.sort(pos_key, dim=1, stable=True)  # stable: tied positives stay in index order
    pos_idx = pos_cols.masked_fill(~valid, num_gallery).gather(1, perm)

    # Bucket = positives with a strictly better score; exact for every item not tied with a positive.
    bucket = torch.searchsorted(pos_key, order_key, side="left")
    tied = pos_key.gather(1, bucket) == order_key
    # Items tied with a positive (every positive, with itself, and rare equal scores) also count the tied
    # positives with a lower gallery index. `first` starts each run of equal positive scores, so
    # (first * width + index) increases along the sorted positives and ranks ties by index.
    rows, cols = tied.nonzero(as_tuple=True)  # host sync, once per chunk
    del tied
    width = num_gallery + 1
    pos_composite = torch.searchsorted(pos_key, pos_key, side="left") * width + pos_idx
    item_composite = bucket[rows, cols] * width + cols
    bucket[rows, cols] = torch.searchsorted(pos_composite[rows], item_composite[:, None]).squeeze(1)

    hist = torch.zeros(bucket.shape[0], pos_key.shape[1] + 1, dtype=torch.int64, device=bucket.device)
    hist.scatter_add_(1, bucket, torch.ones((), dtype=torch.int64, device=bucket.device).expand_as(bucket))
    return hist.cumsum_(1)[:, :-1]


def format_metrics_table(rows: Mapping[str, Mapping[str, float]], label: str = "task") -> str:
    """Render results in the official PrettyTable layout (centred cells, values as ``.3f``).

    Args:
        rows: Task name (e.g. ``"t2i"``, ``"i2t"``) to its :func:`retrieval_metrics` result; each must hold
            ``R1``, ``R5``, ``R10``, ``mAP`` and ``mINP``.
        label: the first column's heading (e.g. "shards" for one row per evaluated set).

    Returns:
        The table as a multi-line string (no trailing newline).
    """
    header = (label, *METRIC_COLUMNS)
    body = [(task, *(f"{metrics[c]:.3f}" for c in METRIC_COLUMNS)) for task, metrics in rows.items()]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: tuple[str, ...]) -> str:
        # str.center splits odd padding exactly as PrettyTable's default centre alignment does.
        return "|" + "|".join(f" {cell.center(w)} " for cell, w in zip(cells, widths, strict=True)) + "|"

    return "\n".join([rule, line(header), rule, *(line(r) for r in body), rule])


def _check_inputs(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    query_pids: torch.Tensor,
    gallery_pids: torch.Tensor,
    chunk_size: int,
    max_rank: int,
) -> None:
    """Raise RetrievalInputError naming the first problem with the arguments of retrieval_metrics."""
    if query_feats.ndim != 2 or gallery_feats.ndim != 2 or query_feats.shape[1] != gallery_feats.shape[1]:
        raise RetrievalInputError(
            f"features must be [Q, D] and [G, D] with the same D, got {tuple(query_feats.shape)} and "
            f"{tuple(gallery_feats.shape)}: pass one feature row per query / gallery item"
        )
    if query_feats.shape[0] == 0 or gallery_feats.shape[0] == 0:
        raise RetrievalInputError("no queries or no gallery items: evaluate a non-empty split")
    for name, pids, feats in (("query", query_pids, query_feats), ("gallery", gallery_pids, gallery_feats)):
        if pids.shape != (feats.shape[0],) or pids.is_floating_point() or pids.is_complex():
            raise RetrievalInputError(
                f"{name}_pids must be an integer tensor of shape [{feats.shape[0]}], got {pids.dtype} "
                f"{tuple(pids.shape)}: pass one integer pid per {name} feature row"
            )
    if chunk_size < 1 or max_rank < 1:
        raise RetrievalInputError(
            f"chunk_size and max_rank must be >= 1, got {chunk_size} and {max_rank}: use positive integers"
        )
    if not (torch.isfinite(query_feats).all() and torch.isfinite(gallery_feats).all()):
        raise RetrievalInputError("features contain NaN or Inf: check the model outputs (e.g. fp16 overflow)")
