"""Gallery index (irra_dist.retrieval.index, irra-index build, irra-search --index) and the ONNX towers
(irra-export, irra-search --runtime onnx), on a tiny random-init model; exact search on the trained demo."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import subprocess_env
from PIL import Image
from search_reference import (
    TINY,
    parse_search_output,
    reference_feats,
    reference_ranking,
    reference_transform,
    write_tiny_run,
)

from irra_dist.data.parsers import parse_dataset
from irra_dist.data.shards import build_shards
from irra_dist.engine import export_cli, index_cli, search_cli
from irra_dist.model import IRRA, build_irra
from irra_dist.retrieval import query
from irra_dist.retrieval.index import (
    FEATURES_FILE,
    INDEX_FILE,
    META_FILE,
    GalleryIndex,
    IndexSpec,
    build_faiss_index,
    normalize_rows,
    recall_at_k,
)
from irra_dist.synthetic.dataset import generate_synthetic_dataset
from irra_dist.tokenizer import tokenize

pytest.importorskip("faiss")
pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
QUERIES = ["a man in a red shirt and blue trousers", "a woman wearing a long black coat"]


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    import faiss

    torch.set_num_threads(1)
    # faiss's OpenMP threads spin while they wait: on two cores shared with other jobs, one thread is
    # several times faster than two.
    faiss.omp_set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("index")
    dataset = root / "data" / "CUHK-PEDES"
    generate_synthetic_dataset(dataset, num_train_ids=3, num_val_ids=1, num_test_ids=5, images_per_id=2,
                               seed=0)
    shards = root / "shards"
    build_shards(parse_dataset("CUHK-PEDES", root / "data"), None, shards, shard_size=4, workers=1)
    torch.manual_seed(0)
    model = build_irra(3, cmt_depth=1, **TINY).eval()
    run = write_tiny_run(root / "run", model, shards)
    torch.manual_seed(7)
    other = write_tiny_run(root / "other_run", build_irra(3, cmt_depth=1, **TINY).eval(), shards)
    records = [a for a in json.loads((dataset / "reid_raw.json").read_text()) if a["split"] == "test"]
    return SimpleNamespace(root=root, shards=shards, run=run, other=other, model=model, records=records,
                           images=sorted((dataset / "imgs" / "test").glob("*.jpg")))


def _build(model: Path, gallery: Path, out: Path, *extra: str) -> int:
    return index_cli.main(["build", str(model), "--gallery", str(gallery), "--out", str(out),
                           "--num-workers", "0", *extra])


@pytest.fixture
def count_encoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the image batches the image tower encodes during the test."""
    calls: list[int] = []
    original = IRRA.encode_image

    def counting(self, images):
        calls.append(len(images))
        return original(self, images)

    monkeypatch.setattr(IRRA, "encode_image", counting)
    return calls


# --------------------------------------------------------------------------------------------------
# faiss: exact and approximate against numpy brute force


def _clustered(num: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised features in 100 clusters, and queries that are noisy copies of gallery rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((100, dim)).astype(np.float32)
    gallery = centres[rng.integers(0, 100, num)] + 0.6 * rng.standard_normal((num, dim)).astype(np.float32)
    queries = gallery[rng.integers(0, num, 200)] + 0.3 * rng.standard_normal((200, dim)).astype(np.float32)
    return normalize_rows(gallery), normalize_rows(queries)


def test_flat_index_is_exact_and_ivfpq_recall_has_a_floor() -> None:
    gallery, queries = _clustered(5000, 32, seed=0)
    exact_order = np.argsort(-(queries.astype(np.float64) @ gallery.T.astype(np.float64)), axis=1)[:, :10]
    scores, flat = build_faiss_index(gallery, IndexSpec("flat")).search(queries, 10)
    assert recall_at_k(flat, exact_order, 10) == 1.0
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ gallery.T, exact_order, 1), atol=1e-5)

    _, ivfpq = build_faiss_index(gallery, IndexSpec("ivfpq", nlist=32, pq_m=8, nprobe=8)).search(queries, 10)
    # Measured 0.64 with 8 bytes per 32-d vector (16x compression) on this data; the floor leaves room for
    # faiss's k-means initialisation. (docs/BENCHMARKS.md: 512-d features at 64 bytes.)
    assert recall_at_k(ivfpq, exact_order, 10) >= 0.5
    _, hnsw = build_faiss_index(gallery, IndexSpec("hnsw", hnsw_m=16, ef_search=64)).search(queries, 10)
    assert recall_at_k(hnsw, exact_order, 10) >= 0.9


def test_recall_at_k_by_hand() -> None:
    found = np.array([[1, 2, 3], [4, 5, -1]])
    exact = np.array([[3, 2, 9], [4, 6, 7]])
    assert recall_at_k(found, exact, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)


# --------------------------------------------------------------------------------------------------
# irra-index build and irra-search --index


def test_shard_index_answers_like_brute_force_cosine(world: SimpleNamespace, tmp_path: Path, capsys,
                                                     fresh_accelerate: None) -> None:
    assert _build(world.run, world.shards, tmp_path / "idx") == 0
    assert "10 images (10 embedded, 0 reused)" in capsys.readouterr().out
    argv = ["--index", str(tmp_path / "idx"), "--query", QUERIES[0], "--query", QUERIES[1],
            "--query-pid", str(world.records[0]["id"]), "--query-pid", "-1", "--top-k", "4",
            "--out", str(tmp_path / "grid.png")]
    assert search_cli.main(argv) == 0
    printed = parse_search_output(capsys.readouterr().out)
    paths = [world.images[0].parent.parent / r["file_path"] for r in world.records]
    order, scores = reference_ranking(world.model, paths, QUERIES, 4)
    assert [[row[4] for row in q] for q in printed] == [[world.records[i]["file_path"] for i in o]
                                                          for o in order]
    np.testing.assert_allclose([[row[1] for row in q] for q in printed], scores.numpy(), atol=1e-4)
    assert [row[2] for row in printed[0]] == [world.records[i]["id"] for i in order[0]]
    assert [row[3] for row in printed[0]] == ["correct" if world.records[i]["id"] == world.records[0]["id"]
                                              else "wrong" for i in order[0]]
    from irra_dist.visualize import GridStyle

    with Image.open(tmp_path / "grid.png") as img:
        assert img.size == GridStyle().canvas_size(2, 4, labelled=True)


def test_index_grows_by_embedding_only_new_or_changed_images(world: SimpleNamespace, tmp_path: Path, capsys,
                                                             count_encoded: list[int],
                                                             fresh_accelerate: None) -> None:
    folder = tmp_path / "gallery"
    folder.mkdir()
    for p in world.images[:5]:
        shutil.copy(p, folder / p.name)
    (folder / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    out = tmp_path / "idx"
    assert _build(world.run, folder, out, "--batch-size", "2") == 0
    assert sum(count_encoded) == 5
    first = np.load(out / FEATURES_FILE)

    count_encoded.clear()
    for p in world.images[5:8]:
        shutil.copy(p, folder / p.name)
    shutil.copy(world.images[9], folder / world.images[0].name)  # same name, new content
    assert _build(world.run, folder, out, "--batch-size", "2") == 0
    assert sum(count_encoded) == 4, "only the 3 new images and the changed one are embedded"
    assert "8 images (4 embedded, 4 reused)" in capsys.readouterr().out
    index = GalleryIndex(out)
    names = index.items.name
    assert sorted(names) == sorted(p.name for p in folder.glob("*.jpg"))
    kept = [names.index(p.name) for p in world.images[1:5]]
    np.testing.assert_array_equal(np.load(out / FEATURES_FILE)[kept], first[1:5])

    paths = [folder / n for n in names]
    reference = normalize_rows(reference_feats(world.model, paths).numpy())
    np.testing.assert_allclose(np.load(out / FEATURES_FILE), reference, atol=1e-5)


def test_interrupted_build_resumes_from_saved_chunks(world: SimpleNamespace, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     fresh_accelerate: None) -> None:
    folder = world.images[0].parent
    original = IRRA.encode_image
    calls: list[int] = []

    def interrupted(self, images):
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a user's Ctrl-C after three batches (1.5 chunks)
        calls.append(len(images))
        return original(self, images)

    monkeypatch.setattr(IRRA, "encode_image", interrupted)
    args = ("--batch-size", "2", "--chunk-size", "4")
    with pytest.raises(KeyboardInterrupt):
        _build(world.run, folder, tmp_path / "idx", *args)
    assert not (tmp_path / "idx" / META_FILE).exists(), "no index appears from an interrupted build"
    chunks = list((tmp_path / "idx" / "partial").rglob("chunk_*.npz"))
    assert len(chunks) == 1

    calls.clear()
    monkeypatch.setattr(IRRA, "encode_image", lambda self, images: calls.append(len(images))
                        or original(self, images))
    assert _build(world.run, folder, tmp_path / "idx", *args) == 0
    assert sum(calls) == 10 - 4, "the saved chunk of 4 images is not embedded again"
    assert not (tmp_path / "idx" / "partial").exists()
    reference = normalize_rows(reference_feats(world.model, world.images).numpy())
    np.testing.assert_allclose(np.load(tmp_path / "idx" / FEATURES_FILE), reference, atol=1e-5)


@pytest.mark.dist
@pytest.mark.slow
def test_two_processes_embed_like_one(world: SimpleNamespace, tmp_path: Path, launch) -> None:
    args = ["build", str(world.run), "--gallery", str(world.images[0].parent), "--out", str(tmp_path / "idx"),
            "--chunk-size", "3", "--batch-size", "2", "--num-workers", "0"]
    done = launch("cpu_2proc.yaml", "index.py", args, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("10 images (10 embedded") == 1, "only the main process reports"
    reference = normalize_rows(reference_feats(world.model, world.images).numpy())
    np.testing.assert_allclose(np.load(tmp_path / "idx" / FEATURES_FILE), reference, atol=1e-5)
    assert GalleryIndex(tmp_path / "idx").items.name == [p.name for p in world.images]


# --------------------------------------------------------------------------------------------------
# ONNX towers


@pytest.fixture(scope="module")
def onnx_export(world: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = world.run / "onnx"  # the default place irra-search --runtime onnx looks in
    assert export_cli.main([str(world.run), "--onnx", str(out)]) == 0
    return out


def test_onnx_towers_match_pytorch(world: SimpleNamespace, onnx_export: Path, capsys) -> None:
    import onnxruntime as ort

    meta = json.loads((onnx_export / "onnx.json").read_text())
    assert max(meta["max_abs_diff"].values()) <= 1e-4
    tf = reference_transform()
    for batch in (1, 5):  # neither is the export's batch of 2: the batch dimension is dynamic
        images = torch.stack([tf(Image.open(p).convert("RGB")) for p in world.images[:batch]])
        ids = tokenize([c for r in world.records for c in r["captions"]][:batch])
        with torch.no_grad():
            want_image, want_text = world.model.encode_image(images), world.model.encode_text(ids)
        image_tower = ort.InferenceSession(str(onnx_export / "image_tower.onnx"))
        text_tower = ort.InferenceSession(str(onnx_export / "text_tower.onnx"))
        (got_image,) = image_tower.run(None, {"images": images.numpy()})
        (got_text,) = text_tower.run(None, {"caption_ids": ids.numpy()})
        assert np.abs(got_image - want_image.numpy()).max() <= 1e-4
        assert np.abs(got_text - want_text.numpy()).max() <= 1e-4


def test_onnx_query_answers_like_torch_without_importing_torch(world: SimpleNamespace, onnx_export: Path,
                                                               tmp_path: Path, capsys,
                                                               fresh_accelerate: None) -> None:
    index = tmp_path / "idx"
    assert _build(world.run, world.shards, index) == 0
    argv = ["--index", str(index), "--query", QUERIES[1], "--top-k", "5", "--out", str(tmp_path / "t.png")]
    capsys.readouterr()
    assert search_cli.main(argv) == 0
    with_torch = parse_search_output(capsys.readouterr().out)
    script = ("import json, sys\nfrom irra_dist.engine.search_cli import main\n"
              f"code = main({[*argv[:-1], str(tmp_path / 'o.png'), '--runtime', 'onnx']!r})\n"
              "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules}))\n")
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True,
                          text=True, timeout=120, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    assert status == {"code": 0, "torch": False}, "the ONNX query path must not import torch"
    with_onnx = parse_search_output(proc.stdout)
    assert [[r[4] for r in q] for q in with_onnx] == [[r[4] for r in q] for q in with_torch]
    np.testing.assert_allclose([[r[1] for r in q] for q in with_onnx],
                               [[r[1] for r in q] for q in with_torch], atol=2e-4)
    assert (tmp_path / "o.png").is_file()


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2


def _bad_index_cases(world: SimpleNamespace, tmp: Path) -> dict[str, tuple]:
    """name -> (command main, argv)."""
    corrupt = tmp / "corrupt"
    shutil.copytree(world.index, corrupt)
    with open(corrupt / INDEX_FILE, "r+b") as f:
        f.truncate(100)
    garbage = tmp / "garbage"
    shutil.copytree(world.index, garbage)
    (garbage / META_FILE).write_text("{not json")
    swapped = tmp / "swapped"  # a faiss file of the right size that is not a faiss index
    shutil.copytree(world.index, swapped)
    size = (swapped / INDEX_FILE).stat().st_size
    (swapped / INDEX_FILE).write_bytes(b"\0" * size)
    texts = tmp / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("hello")
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    other_onnx = tmp / "other_onnx"
    export_cli.main([str(world.other), "--onnx", str(other_onnx)])
    q = ["--query", "a person"]
    return {
        "corrupt index": (search_cli.main, ["--index", str(corrupt), *q]),
        "garbage index.json": (search_cli.main, ["--index", str(garbage), *q]),
        "not a faiss file": (search_cli.main, ["--index", str(swapped), *q]),
        "no index": (search_cli.main, ["--index", str(tmp), *q]),
        "empty query": (search_cli.main, ["--index", str(world.index), "--query", "  "]),
        "no query": (search_cli.main, ["--index", str(world.index)]),
        "another model (torch)": (search_cli.main, ["--index", str(world.index), "--run", str(world.other),
                                                   *q]),
        "another model (onnx)": (search_cli.main, ["--index", str(world.index), "--runtime", "onnx", "--onnx",
                                                  str(other_onnx), *q]),
        "missing onnx export": (search_cli.main, ["--index", str(world.index), "--runtime", "onnx", "--onnx",
                                                 str(tmp / "nowhere"), *q]),
        "folder of non-images": (index_cli.main, ["build", str(world.run), "--gallery", str(texts),
                                                  "--out", str(tmp / "o1")]),
        "only unreadable images": (index_cli.main, ["build", str(world.run), "--gallery", str(broken),
                                                    "--out", str(tmp / "o2"), "--num-workers", "0"]),
        "ivf without pq": (index_cli.main, ["build", str(world.run), "--gallery", str(world.shards),
                                            "--out", str(tmp / "o3"), "--ivf", "4"]),
        "ivfpq on too few images": (index_cli.main, ["build", str(world.run), "--gallery", str(world.shards),
                                                     "--out", str(tmp / "o4"), "--ivf", "4", "--pq", "8",
                                                     "--num-workers", "0"]),
        "index of another model at --out": (index_cli.main, ["build", str(world.other), "--gallery",
                                                             str(world.shards), "--out", str(world.index)]),
        "--out is not an index": (index_cli.main, ["build", str(world.run), "--gallery", str(world.shards),
                                                   "--out", str(texts)]),
        "missing model": (index_cli.main, ["build", str(tmp / "nope"), "--gallery", str(world.shards),
                                           "--out", str(tmp / "o5")]),
    }


BAD = ["corrupt index", "garbage index.json", "not a faiss file", "no index", "empty query", "no query",
       "another model (torch)", "another model (onnx)", "missing onnx export", "folder of non-images",
       "only unreadable images", "ivf without pq", "ivfpq on too few images",
       "index of another model at --out", "--out is not an index", "missing model"]


@pytest.fixture(scope="module")
def bad_cases(world: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    from conftest import reset_accelerate

    reset_accelerate()
    world.index = tmp_path_factory.mktemp("good") / "idx"
    assert _build(world.run, world.shards, world.index) == 0
    reset_accelerate()
    return _bad_index_cases(world, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line(bad_cases: dict[str, tuple], case: str, capsys,
                                         fresh_accelerate: None) -> None:
    command, argv = bad_cases[case]
    before = os.listdir(argv[argv.index("--out") + 1]) if "--out" in argv and Path(
        argv[argv.index("--out") + 1]).is_dir() else None
    capsys.readouterr()
    assert command(argv) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"irra-(search|index): error: [^\n]+", err), err
    if before is not None:
        assert os.listdir(argv[argv.index("--out") + 1]) == before, "a refused build leaves --out as it was"
    if case.startswith("another model"):
        assert "another model" in err


# --------------------------------------------------------------------------------------------------
# A trained model: the index answers exactly as the PyTorch ranking of irra-search


@pytest.mark.slow
def test_exact_index_matches_pytorch_ranking_on_demo_gallery(demo_run: tuple[Path, str], tmp_path: Path,
                                                             fresh_accelerate: None) -> None:
    from irra_dist.retrieval.cache import cached_gallery_features
    from irra_dist.retrieval.gallery import ShardGallery, split_caption_queries
    from irra_dist.retrieval.model import load_search_model
    from irra_dist.retrieval.ranking import search

    run, _ = demo_run
    loaded = load_search_model(run=run)
    shards = loaded.default_gallery
    assert _build(run, shards, tmp_path / "idx", "--batch-size", "128") == 0
    fixed = split_caption_queries(shards, "test", 50)
    gallery = ShardGallery(shards, "test")
    feats, _, _ = cached_gallery_features(loaded, gallery, cache_dir=tmp_path / "cache")
    expected = search(loaded, gallery, feats, fixed.texts, fixed.pids.tolist(), top_k=10)

    index = GalleryIndex(tmp_path / "idx")
    encoder = query.open_text_encoder(index, runtime="torch", device="cpu")
    got = query.query_index(index, encoder, fixed.texts, fixed.pids.tolist(), top_k=10)
    assert [r.indices for r in got] == [r.indices for r in expected]
    assert [r.names for r in got] == [r.names for r in expected]
    assert [r.correct for r in got] == [r.correct for r in expected]
    np.testing.assert_allclose([r.scores for r in got], [r.scores for r in expected], atol=1e-5)


# --------------------------------------------------------------------------------------------------
# irra-serve in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HIT = re.compile(r'<div class="hit" data-rank="(\d+)" data-index="(\d+)" data-score="([^"]+)" '
                 r'data-name="([^"]+)"(?: data-pid="(\d+)")?>')


def _get(url: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _run_group(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; the whole group is killed if it overruns."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_search_page_in_headless_chromium(world: SimpleNamespace, onnx_export: Path, tmp_path: Path,
                                          fresh_accelerate: None) -> None:
    from conftest import free_port

    index = tmp_path / "idx"
    assert _build(world.run, world.shards, index) == 0
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "irra_dist.engine.serve", str(index), "--port",
                               str(port), "--runtime", "onnx"], env=subprocess_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.communicate()[1][-2000:]
            try:
                status, body = _get(f"{base}/api/info")
                break
            except OSError:
                assert time.monotonic() < deadline, "irra-serve did not answer within 60 s"
                time.sleep(0.2)
        assert status == 200 and json.loads(body)["num_images"] == len(world.records)

        paths = [world.images[0].parent.parent / r["file_path"] for r in world.records]
        order, scores = reference_ranking(world.model, paths, QUERIES[:1], 4)
        status, body = _get(f"{base}/api/search?q={urllib.parse.quote(QUERIES[0])}&k=4")
        assert status == 200
        hits = json.loads(body)["results"]
        assert [h["name"] for h in hits] == [world.records[i]["file_path"] for i in order[0]]
        assert [h["pid"] for h in hits] == [world.records[i]["id"] for i in order[0]]
        np.testing.assert_allclose([h["score"] for h in hits], scores[0].numpy(), atol=1e-4)
        status, body = _get(f"{base}/{hits[0]['image']}")
        assert status == 200 and body == paths[order[0][0]].read_bytes()
        status, body = _get(f"{base}/api/search?q=%20%20")
        assert status == 400 and "empty" in json.loads(body)["error"]

        profile = tmp_path / "chromium-profile"
        page = _run_group([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=15000",
                           "--dump-dom", f"{base}/?q={urllib.parse.quote(QUERIES[0])}&k=4"], timeout=90)
        assert page.returncode == 0, page.stderr[-2000:]
        shown = HIT.findall(page.stdout)
        assert [(int(r), int(i), n, int(p)) for r, i, _, n, p in shown] == [
            (h["rank"], h["index"], h["name"], h["pid"]) for h in hits], page.stdout[-3000:]
        assert [float(s) for _, _, s, _, _ in shown] == pytest.approx([h["score"] for h in hits], abs=1e-6)
        assert "4 results for" in page.stdout
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.communicate()


def test_images_reach_the_browser_in_a_format_it_reads(world: SimpleNamespace) -> None:
    from irra_dist.engine.serve import browser_image

    jpeg = world.images[0].read_bytes()
    assert browser_image(jpeg) == (jpeg, "image/jpeg")
    with Image.open(world.images[0]) as img:
        pixels = np.asarray(img.convert("RGB"))
    ppm = io.BytesIO()
    Image.fromarray(pixels).save(ppm, format="PPM")  # as shards built with --pre-resize-format ppm hold
    data, kind = browser_image(ppm.getvalue())
    assert kind == "image/png"
    with Image.open(io.BytesIO(data)) as png:
        assert png.format == "PNG"
        np.testing.assert_array_equal(np.asarray(png), pixels)
