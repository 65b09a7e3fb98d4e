"""Retrieval-metric time and peak memory: chunked exact metrics vs the official full-sort rank().

Sizes are the text-to-image test protocols: CUHK-PEDES 6,156 queries x 3,074 images and ICFG-PEDES
19,848 x 19,848, D = 512, with synthetic features clustered by 1,000 identities. Each measurement runs in
a fresh subprocess: time is the wall clock of one call (normalisation, similarity and metrics), and peak
memory is the growth of the resident set during that call (VmHWM after resetting it through
/proc/self/clear_refs, minus VmRSS just before the call), i.e. what the computation itself allocates.
The full-sort baseline is skipped, with a note, when the machine lacks the memory it needs.

Usage: python bench/bench_metrics.py [--quick] [--json PATH] [--device cpu|cuda]
"""

from __future__ import annotations

import sys
import time

from common import bench_main, measure_in_subprocess, peak_rss_growth, proc_kib, reset_peak_rss

# Problem sizes: (queries, gallery, identities).
FULL_SIZES = {"CUHK-PEDES": (6156, 3074, 1000), "ICFG-PEDES/2": (9924, 9924, 500),
              "ICFG-PEDES": (19848, 19848, 1000)}
QUICK_SIZES = {"CUHK-PEDES/4": (1539, 769, 250), "ICFG-PEDES/8": (2481, 2481, 125)}
DIM = 512
CHUNK_SIZE = 1024
NOISE = 2.5
"""Per-dimension noise around the identity centres: R1 about 67% at the CUHK size, like a trained model."""
# Bytes per query x gallery pair at the baseline's peak, measured (41 at 2,481^2): similarity 4, argsort
# values 4 + indices 8, gathered labels 8, matches 1, int64 cumsum 8, float columns and their stack 4 + 4.
FULL_SORT_BYTES_PER_PAIR = 42
BASELINE_MAX_GIB = 8.0
"""Default cap on the baseline's estimated peak: the machines this runs on are shared."""
METRICS = ("R1", "R5", "R10", "mAP", "mINP")
FOOTER = "ratio = full sort / chunked; max |dM| = largest metric difference between the two, in % points"


def official_rank(similarity, q_pids, g_pids, max_rank: int = 10):
    """A line-by-line port of the official utils/metrics.py rank() (get_mAP=True path)."""
    import torch

    indices = torch.argsort(similarity, dim=1, descending=True)
    pred_labels = g_pids[indices]
    matches = pred_labels.eq(q_pids.view(-1, 1))

    all_cmc = matches[:, :max_rank].cumsum(1)
    all_cmc[all_cmc > 1] = 1
    all_cmc = all_cmc.float().mean(0) * 100

    num_rel = matches.sum(1)
    tmp_cmc = matches.cumsum(1)
    inp = [tmp_cmc[i][row.nonzero()[-1]] / (row.nonzero()[-1] + 1.0) for i, row in enumerate(matches)]
    m_inp = torch.cat(inp).mean() * 100

    tmp_cmc = [tmp_cmc[:, i] / (i + 1.0) for i in range(tmp_cmc.shape[1])]
    tmp_cmc = torch.stack(tmp_cmc, 1) * matches
    ap = tmp_cmc.sum(1) / num_rel
    m_ap = ap.mean() * 100
    return all_cmc, m_ap, m_inp


def _synthetic(num_queries: int, num_gallery: int, num_ids: int, device: str):
    """Features near one centre per identity; every identity has gallery items and queries."""
    import torch

    gen = torch.Generator().manual_seed(0)
    g_pids = torch.arange(num_gallery) % num_ids
    q_pids = g_pids[torch.arange(num_queries) % num_gallery]  # captions of each image, like the protocols
    centres = torch.randn(num_ids, DIM, generator=gen)
    gallery = centres[g_pids].add_(torch.randn(num_gallery, DIM, generator=gen), alpha=NOISE)
    queries = centres[q_pids].add_(torch.randn(num_queries, DIM, generator=gen), alpha=NOISE)
    return [t.to(device) for t in (queries, gallery, q_pids, g_pids)]


def _worker(method: str, num_queries: int, num_gallery: int, num_ids: int, device: str) -> dict:
    """Run one method once in this process and measure it."""
    import torch
    import torch.nn.functional as F

    from irra_dist.evaluation import retrieval_metrics

    queries, gallery, q_pids, g_pids = _synthetic(num_queries, num_gallery, num_ids, device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    start = time.perf_counter()
    if method == "chunked":
        result = retrieval_metrics(queries, gallery, q_pids, g_pids, chunk_size=CHUNK_SIZE)
    else:
        similarity = F.normalize(queries, p=2, dim=1) @ F.normalize(gallery, p=2, dim=1).t()
        cmc, m_ap, m_inp = official_rank(similarity, q_pids, g_pids)
        result = {"R1": cmc[0].item(), "R5": cmc[4].item(), "R10": cmc[9].item(), "mAP": m_ap.item(),
                  "mINP": m_inp.item()}
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = max(torch.cuda.max_memory_allocated() - base, 0) if cuda else peak_rss_growth(base)
    return {"seconds": seconds, "peak_bytes": peak, "metrics": result}


def _available_bytes() -> int:
    return proc_kib("/proc/meminfo", "MemAvailable") * 1024


def _measure(method: str, size: tuple[int, int, int], device: str) -> dict:
    """Run _worker in a fresh interpreter so peaks and caches of one run never leak into another."""
    return measure_in_subprocess(__file__, [method, *map(str, size), device])


def _worker_main(args: list[str]) -> dict:
    method, num_queries, num_gallery, num_ids, device = args
    return _worker(method, int(num_queries), int(num_gallery), int(num_ids), device)


def run(quick: bool, device: str = "cpu", baseline_max_gib: float = BASELINE_MAX_GIB) -> list[dict]:
    """Measure both methods at each size; one row per (size, quantity).

    Args:
        quick: Use the reduced sizes (well under a minute in all).
        device: ``cpu`` or ``cuda``.
        baseline_max_gib: Skip the full-sort baseline where its estimated peak exceeds this or the memory
            available now (CPU only).

    Returns:
        Rows with ``name``, ``value`` (chunked), ``unit``, ``baseline`` (full sort), ``ratio``
        (baseline / value: above 1 means the chunked method is faster / smaller) and ``metrics_max_abs_diff``
        (largest difference between the two methods' metrics, in percent points).
    """
    rows = []
    for label, size in (QUICK_SIZES if quick else FULL_SIZES).items():
        ours = _measure("chunked", size, device)
        need = FULL_SORT_BYTES_PER_PAIR * size[0] * size[1]
        limit = min(baseline_max_gib * 2**30, _available_bytes()) if device == "cpu" else float("inf")
        if need > limit:
            base = None
            note = f"full sort skipped: needs ~{need / 2**30:.1f} GiB, limit {limit / 2**30:.1f} GiB"
        else:
            base = _measure("full_sort", size, device)
            note = ""
        diff = (max(abs(ours["metrics"][k] - base["metrics"][k]) for k in METRICS) if base else None)
        for quantity, unit, scale in (("seconds", "s", 1.0), ("peak_bytes", "MiB", 2.0**-20)):
            value = ours[quantity] * scale
            baseline = base[quantity] * scale if base else None
            rows.append({
                "name": f"{label} {size[0]}x{size[1]} {'time' if unit == 's' else 'peak memory'}",
                "value": value, "unit": unit, "baseline": baseline,
                "ratio": baseline / value if baseline is not None and value > 0 else None,
                "metrics_max_abs_diff": diff, "device": device, "chunk_size": CHUNK_SIZE,
                "metrics": ours["metrics"], "note": note,
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line: print the table, optionally write the rows as JSON."""
    options = [
        ("--device", {"default": "cpu", "help": "cpu or cuda"}),
        ("--baseline-max-gib", {"type": float, "default": BASELINE_MAX_GIB,
                                "help": "skip the full-sort baseline where its estimated peak exceeds this"}),
    ]
    labels = {"value": "chunked", "baseline": "full sort", "metrics_max_abs_diff": "max |dM|"}
    return bench_main(run, __doc__, argv, extra_args=options, worker=_worker_main, labels=labels,
                      extra_columns=("metrics_max_abs_diff", "note"), footer=lambda rows: FOOTER)


if __name__ == "__main__":
    sys.exit(main())
