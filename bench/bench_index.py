"""Gallery index at scale (faiss exact vs IVF-PQ), text-query latency (PyTorch vs onnxruntime), and the
embedding throughput of ``irra-index build``.

Run: ``python bench/bench_index.py [--quick] [--sizes 100000,1000000] [--json PATH]``.

- Index rows, per gallery size N of synthetic L2-normalised 512-d features (2,000 Gaussian clusters, so that
  nearest neighbours mean something; queries are noisy copies of random gallery rows): build time, peak
  resident memory growth during the build and the index file size; query latency p50/p99 at batch 1 and
  batch 64 (value: IVF-PQ, baseline: exact flat inner product, ratio: how many times faster IVF-PQ is);
  recall@10 of IVF-PQ against the exact top-10. IVF-PQ: nlist = sqrt(N) rounded to a power of two, 64
  bytes per image (PQ64), nprobe 32, trained on a sample of 32 images per cell. Latencies are measured on
  a bounded query subset (50 single queries, 5 batches of 64) to keep the 1M run within minutes. faiss
  runs with ``--threads`` OpenMP threads (default 1: its threads spin while waiting, which costs several
  times the time on cores shared with other jobs).
- Text query: one query string to its feature (tokenise + text tower), p50 of 50, with the text tower in
  onnxruntime (value) against PyTorch (baseline), both with 2 threads, for the demo model and the ViT-B/16
  CLIP text tower shape (random init: only the shape matters for time).
- Embedding: images per second of ``irra-index build`` (model load to written index) on a demo-shaped
  model over a folder of synthetic person images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import bench_main, peak_rss_growth, reset_peak_rss

DIM = 512
CLUSTERS = 2000
QUERY = "a woman wearing a red coat and black trousers, carrying a blue backpack"


def _features(num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`num` clustered unit vectors and 1,000 queries near random gallery rows."""
    from irra_dist.retrieval.index import normalize_rows

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, DIM), dtype=np.float32)
    gallery = rng.standard_normal((num, DIM), dtype=np.float32)
    gallery *= 0.7
    gallery += centres[rng.integers(0, CLUSTERS, num)]
    gallery = normalize_rows(gallery)
    queries = gallery[rng.integers(0, num, 1000)] + 0.05 * rng.standard_normal((1000, DIM), dtype=np.float32)
    return gallery, normalize_rows(queries)


def _latencies_ms(index, queries: np.ndarray, batch: int, repeats: int) -> list[float]:
    times = []
    for r in range(repeats):
        chunk = queries[(r * batch) % len(queries):][:batch]
        start = time.perf_counter()
        index.search(chunk, 10)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def _index_rows(num: int, quick: bool) -> list[dict]:
    import faiss

    from irra_dist.retrieval.index import IndexSpec, build_faiss_index, recall_at_k

    gallery, queries = _features(num)
    nlist = 1 << int(round(np.log2(np.sqrt(num))))
    specs = {"flat": IndexSpec("flat"), "ivfpq": IndexSpec("ivfpq", nlist=nlist, pq_m=64, nprobe=32)}
    built, stats = {}, {}
    for kind, spec in specs.items():
        train = gallery
        if kind == "ivfpq":  # k-means on a sample: 32 images per cell (faiss would take up to 256)
            train = gallery[np.random.default_rng(1).choice(num, min(num, 32 * nlist), replace=False)]
        base = reset_peak_rss()
        start = time.perf_counter()
        if kind == "ivfpq":
            index = build_faiss_index(train, spec)
            index.reset()  # keep the training, index every image
            index.add(gallery)
        else:
            index = build_faiss_index(gallery, spec)
        seconds = time.perf_counter() - start
        stats[kind] = {"build_s": seconds, "rss_mib": peak_rss_growth(base) / 2**20,
                       "file_mib": faiss.serialize_index(index).nbytes / 2**20}
        built[kind] = index
    singles, batches = (20, 2) if quick else (50, 5)
    lat = {kind: {1: _latencies_ms(idx, queries, 1, singles), 64: _latencies_ms(idx, queries, 64, batches)}
           for kind, idx in built.items()}
    exact = built["flat"].search(queries[:200], 10)[1]
    approx = built["ivfpq"].search(queries[:200], 10)[1]
    tag = f"{num // 1000}k"
    rows = []
    for what in ("build_s", "rss_mib", "file_mib"):
        unit = {"build_s": "s", "rss_mib": "MiB", "file_mib": "MiB"}[what]
        rows.append({"name": f"{tag}_{what}", "value": stats["ivfpq"][what], "unit": unit,
                     "baseline": stats["flat"][what], "ratio": None,
                     "note": f"value IVF{nlist},PQ64; baseline exact"})
    for batch in (1, 64):
        for pct in (50, 99):
            value, baseline = _p(lat["ivfpq"][batch], pct), _p(lat["flat"][batch], pct)
            rows.append({"name": f"{tag}_query_ms_p{pct}_batch{batch}", "value": value, "unit": "ms",
                         "baseline": baseline, "ratio": baseline / value,
                         "note": f"{len(lat['flat'][batch])} searches"})
    rows.append({"name": f"{tag}_recall_at_10", "value": recall_at_k(approx, exact, 10), "unit": "",
                 "baseline": 1.0, "ratio": None, "note": f"IVF{nlist},PQ64 nprobe 32 vs exact, 200 queries"})
    return rows


def _text_rows(quick: bool) -> list[dict]:
    import torch

    from irra_dist.config import load_config
    from irra_dist.model import build_irra_from_config
    from irra_dist.model.onnx import export_towers
    from irra_dist.retrieval.onnx_runtime import OnnxTextEncoder
    from irra_dist.tokenizer import tokenize

    torch.set_num_threads(2)
    shapes = {"demo": [], "clip_b16": ["model.pretrained=none", "model.embed_dim=512",
                                       "model.text_width=512", "model.text_layers=12", "model.text_heads=8",
                                       "model.vision_layers=1", "model.vision_width=64",
                                       "model.vision_heads=1"]}
    if quick:
        shapes.pop("clip_b16")
    rows = []
    for name, overrides in shapes.items():
        cfg = load_config("demo", overrides)
        torch.manual_seed(0)
        model = build_irra_from_config(dataclasses.replace(cfg.model, pretrained="none"), 1,
                                       with_mlm=False).eval()
        with tempfile.TemporaryDirectory() as tmp:
            export_towers(model, tmp, towers=("text",))
            encoder = OnnxTextEncoder(tmp, threads=2)
            encoder.encode([QUERY])  # warm-up
            onnx_ms = []
            for _ in range(50):
                start = time.perf_counter()
                encoder.encode([QUERY])
                onnx_ms.append((time.perf_counter() - start) * 1e3)
        torch_ms = []
        with torch.no_grad():
            model.encode_text(tokenize([QUERY]))
            for _ in range(50):
                start = time.perf_counter()
                model.encode_text(tokenize([QUERY]))
                torch_ms.append((time.perf_counter() - start) * 1e3)
        value, baseline = statistics.median(onnx_ms), statistics.median(torch_ms)
        rows.append({"name": f"text_query_ms_{name}", "value": value, "unit": "ms", "baseline": baseline,
                     "ratio": baseline / value, "note": "onnxruntime vs PyTorch, p50 of 50, 2 threads"})
    return rows


def _embedding_rows(quick: bool) -> list[dict]:
    import torch

    from irra_dist.config import load_config, save_config
    from irra_dist.engine.index_cli import main as index_main
    from irra_dist.model import build_irra_from_config, save_weights_safetensors
    from irra_dist.synthetic.dataset import generate_synthetic_dataset

    num_ids = 16 if quick else 200
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_synthetic_dataset(root / "data", num_train_ids=1, num_val_ids=0, num_test_ids=num_ids,
                                   seed=0, workers=2)
        images = root / "data" / "imgs" / "test"
        count = len(list(images.glob("*.jpg")))
        cfg = load_config("demo", [f"data.shards={root / 'none'}"])
        torch.manual_seed(0)
        model = build_irra_from_config(dataclasses.replace(cfg.model, pretrained="none"), 1, with_mlm=False)
        run = root / "run"
        run.mkdir()
        save_config(cfg, run / "config.yaml")
        save_weights_safetensors(model, run / "model.safetensors")
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = index_main(["build", str(run), "--gallery", str(images), "--out", str(root / "idx"),
                               "--num-workers", "2", "--batch-size", "128"])
        seconds = time.perf_counter() - start
        if code != 0:
            raise RuntimeError(f"irra-index build failed with status {code}")
    return [{"name": "index_build_images_per_s_demo", "value": count / seconds, "unit": "img/s",
             "baseline": None, "ratio": None,
             "note": f"{count} images 96x32, demo model, 1 process, 2 decode workers, wall incl. model load"}]


def run(quick: bool, sizes: str = "100000,1000000", threads: int = 1, parts: str = "index,text,embed"
        ) -> list[dict]:
    """All rows; ``--quick``: one 20k gallery, the demo text tower, 16 identities to embed."""
    import faiss

    faiss.omp_set_num_threads(threads)
    rows = []
    if "index" in parts:
        for num in ([20_000] if quick else [int(s) for s in sizes.split(",")]):
            rows += _index_rows(num, quick)
    if "text" in parts:
        rows += _text_rows(quick)
    if "embed" in parts:
        rows += _embedding_rows(quick)
    return rows


def main(argv: list[str] | None = None) -> int:
    return bench_main(run, __doc__, argv, extra_columns=("note",),
                      extra_args=[("--sizes", {"default": "100000,1000000",
                                               "help": "gallery sizes, comma-separated"}),
                                  ("--threads", {"type": int, "default": 1, "help": "faiss OpenMP threads"}),
                                  ("--parts", {"default": "index,text,embed",
                                               "help": "which measurements, comma-separated"})],
                      labels={"value": "value", "baseline": "baseline"})


if __name__ == "__main__":
    raise SystemExit(main())
