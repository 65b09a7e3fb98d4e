"""Free-text search (irra_dist.retrieval, irra-search) on a tiny random-init model and a tiny shard set."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from search_reference import (
    IMAGE_SIZE,
    TINY,
    parse_search_output,
    reference_feats,
    reference_ranking,
    tiny_run_config,
    write_tiny_run,
)

from irra_dist.config import config_from_dict, dump_config
from irra_dist.data.parsers import parse_dataset
from irra_dist.data.shards import build_shards
from irra_dist.engine.search_cli import main
from irra_dist.model import IRRA, build_irra, export_official_checkpoint, save_weights_safetensors
from irra_dist.retrieval import results as search_results
from irra_dist.retrieval.cache import cached_gallery_features, gallery_cache_path
from irra_dist.retrieval.examples import RetrievalExamples
from irra_dist.retrieval.gallery import FolderGallery, ShardGallery, split_caption_queries
from irra_dist.retrieval.model import load_search_model
from irra_dist.retrieval.ranking import search
from irra_dist.synthetic.dataset import generate_synthetic_dataset
from irra_dist.tokenizer import tokenize
from irra_dist.visualize import GridStyle

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("search")
    dataset = root / "data" / "CUHK-PEDES"
    generate_synthetic_dataset(dataset, num_train_ids=3, num_val_ids=1, num_test_ids=4, images_per_id=2,
                               seed=0)
    shards = root / "shards"
    build_shards(parse_dataset("CUHK-PEDES", root / "data"), None, shards, shard_size=3, workers=1)
    torch.manual_seed(0)
    model = build_irra(3, cmt_depth=1, **TINY).eval()
    run = write_tiny_run(root / "run", model, shards)
    annotations = json.loads((dataset / "reid_raw.json").read_text())
    test_records = [a for a in annotations if a["split"] == "test"]
    return SimpleNamespace(root=root, dataset=dataset, shards=shards, run=run, model=model,
                           test_records=test_records, test_images=dataset / "imgs" / "test")


QUERIES = ["a man in a red shirt and blue trousers", "a woman wearing a long black coat"]


def test_shard_search_ranks_like_brute_force_cosine(world: SimpleNamespace, tmp_path: Path) -> None:
    loaded = load_search_model(run=world.run)
    gallery = ShardGallery(world.shards, "test")
    feats, _, _ = cached_gallery_features(loaded, gallery, cache_dir=tmp_path)
    results = search(loaded, gallery, feats, QUERIES, top_k=5)
    paths = [world.test_images.parent / r["file_path"] for r in world.test_records]
    order, scores = reference_ranking(world.model, paths, QUERIES, 5)
    assert [r.indices for r in results] == order
    torch.testing.assert_close(torch.tensor([r.scores for r in results], dtype=torch.float64), scores,
                               atol=1e-5, rtol=0)
    assert results[0].names == [world.test_records[i]["file_path"] for i in order[0]]
    assert results[0].pids == [world.test_records[i]["id"] for i in order[0]]


def test_cli_prints_top_k_writes_grid_and_reuses_the_cache(world: SimpleNamespace, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    calls = []
    original = IRRA.encode_image

    def counting(self, images):
        calls.append(len(images))
        return original(self, images)

    monkeypatch.setattr(IRRA, "encode_image", counting)
    cache = tmp_path / "cache"
    argv = ["--run", str(world.run), "--query", QUERIES[0], "--query", QUERIES[1], "--top-k", "3",
            "--cache-dir", str(cache), "--out", str(tmp_path / "grid.png"), "--num-workers", "0"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert sum(calls) == len(world.test_records), "every gallery image is encoded once"
    cached = sorted(cache.glob("gallery_*.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns

    calls.clear()
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert calls == [], "the second search must read the gallery features from the cache"
    assert cached[0].stat().st_mtime_ns == stamp
    assert parse_search_output(first) == parse_search_output(second)

    paths = [world.test_images.parent / r["file_path"] for r in world.test_records]
    order, _ = reference_ranking(world.model, paths, QUERIES, 3)
    printed = parse_search_output(first)
    assert [[row[4] for row in q] for q in printed] == [[world.test_records[i]["file_path"] for i in o]
                                                          for o in order]
    assert [[row[0] for row in q] for q in printed] == [[1, 2, 3]] * 2
    with Image.open(tmp_path / "grid.png") as img:
        assert img.format == "PNG"
        assert img.size == GridStyle().canvas_size(2, 3, labelled=True)


def test_cache_key_follows_weights_gallery_and_image_size(world: SimpleNamespace, tmp_path: Path) -> None:
    shard_gallery = ShardGallery(world.shards, "test")
    base = gallery_cache_path(tmp_path, "a" * 64, shard_gallery, IMAGE_SIZE)
    assert base == gallery_cache_path(tmp_path, "a" * 64, ShardGallery(world.shards, "test"), IMAGE_SIZE)
    assert base != gallery_cache_path(tmp_path, "b" * 64, shard_gallery, IMAGE_SIZE)
    assert base != gallery_cache_path(tmp_path, "a" * 64, shard_gallery, (64, 32))
    assert base != gallery_cache_path(tmp_path, "a" * 64, ShardGallery(world.shards, "val"), IMAGE_SIZE)
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(next(world.test_images.glob("*.jpg")).read_bytes())
    before = FolderGallery(folder).content_key
    (folder / "b.jpg").write_bytes((folder / "a.jpg").read_bytes())
    assert FolderGallery(folder).content_key != before

    # new weights -> a new cache file, not the old features
    torch.manual_seed(1)
    other_run = write_tiny_run(tmp_path / "run2", build_irra(3, cmt_depth=1, **TINY), world.shards)
    cache = tmp_path / "cache"
    _, p1, hit1 = cached_gallery_features(load_search_model(run=world.run), shard_gallery, cache_dir=cache)
    _, p2, hit2 = cached_gallery_features(load_search_model(run=other_run), shard_gallery, cache_dir=cache)
    assert p1 != p2 and not hit1 and not hit2


def test_corrupt_cache_file_is_recomputed(world: SimpleNamespace, tmp_path: Path) -> None:
    loaded = load_search_model(run=world.run)
    gallery = ShardGallery(world.shards, "test")
    feats, path, _ = cached_gallery_features(loaded, gallery, cache_dir=tmp_path)
    path.write_bytes(b"not a safetensors file")
    again, path2, hit = cached_gallery_features(loaded, gallery, cache_dir=tmp_path)
    assert path2 == path and not hit
    torch.testing.assert_close(again, feats)


def test_folder_gallery_search(world: SimpleNamespace, tmp_path: Path, capsys) -> None:
    argv = ["--run", str(world.run), "--gallery", str(world.test_images), "--query", QUERIES[0],
            "--top-k", "4", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "g.png"),
            "--num-workers", "1"]
    assert main(argv) == 0
    (rows,) = parse_search_output(capsys.readouterr().out)
    paths = sorted(world.test_images.glob("*.jpg"))
    order, scores = reference_ranking(world.model, paths, QUERIES[:1], 4)
    assert [r[4] for r in rows] == [paths[i].name for i in order[0]]
    assert all(r[2] is None and r[3] is None for r in rows), "a folder gallery has no pids"
    assert [r[1] for r in rows] == pytest.approx(scores[0].tolist(), abs=1e-4)
    with Image.open(tmp_path / "g.png") as img:
        assert img.size == GridStyle().canvas_size(1, 4, labelled=True)


def test_query_pids_mark_hits_correct_or_wrong(world: SimpleNamespace, tmp_path: Path, capsys) -> None:
    pid = world.test_records[0]["id"]
    argv = ["--run", str(world.run), "--query", QUERIES[0], "--query-pid", str(pid), "--top-k", "8",
            "--from-split-captions", "2", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "g.png"),
            "--num-workers", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    queries = parse_search_output(out)
    assert len(queries) == 3
    own_pids = [pid] + [r["id"] for r in _first_of_distinct_pids(world.test_records, 2)]
    for rows, qpid in zip(queries, own_pids):
        assert len(rows) == 8
        assert [r[3] for r in rows] == ["correct" if r[2] == qpid else "wrong" for r in rows]
        assert sum(r[3] == "correct" for r in rows) == sum(a["id"] == qpid for a in world.test_records)


def _first_of_distinct_pids(records: list[dict], n: int) -> list[dict]:
    chosen, seen = [], set()
    for rec in records:
        if rec["id"] not in seen:
            seen.add(rec["id"])
            chosen.append(rec)
    return chosen[:n]


def test_split_caption_queries_are_the_first_caption_of_distinct_pids(world: SimpleNamespace) -> None:
    queries = split_caption_queries(world.shards, "test", 3)
    expected = _first_of_distinct_pids(world.test_records, 3)
    assert queries.texts == [r["captions"][0] for r in expected]
    assert queries.pids.tolist() == [r["id"] for r in expected]
    assert torch.equal(queries.caption_ids, tokenize(queries.texts))
    all_captions = [(rec["id"], c) for rec in world.test_records for c in rec["captions"]]
    assert [all_captions[i] for i in queries.query_index.tolist()] == list(zip(queries.pids.tolist(),
                                                                               queries.texts))
    assert len(split_caption_queries(world.shards, "test", 100).texts) == 4  # only 4 test ids exist


def test_trainer_retrieval_examples_from_evaluation_outputs(world: SimpleNamespace, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    examples = RetrievalExamples(world.shards, "test", num_queries=3, top_k=2)
    paths = [world.test_images.parent / r["file_path"] for r in world.test_records]
    g_feats = reference_feats(world.model, paths)
    g_pids = torch.tensor([r["id"] for r in world.test_records])
    captions = [c for r in world.test_records for c in r["captions"]]
    with torch.no_grad():
        q_feats = world.model.encode_text(tokenize(captions))
    # As an evaluation may hand them over: rows shuffled, and the second fixed query was skipped.
    perm = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0))
    dropped = int(examples.queries.query_index[1])
    keep = torch.tensor([i for i in range(len(captions)) if i != dropped])
    asked: list[int] = []
    original = examples.gallery.load_images
    monkeypatch.setattr(examples.gallery, "load_images", lambda idx: asked.extend(idx) or original(idx))

    out = examples.save(tmp_path / "ex.png", g_feats[perm], g_pids[perm], perm, q_feats[keep], keep)
    texts = [examples.queries.texts[0], examples.queries.texts[2]]
    order, _ = reference_ranking(world.model, paths, texts, 2)
    assert sorted(asked) == sorted({i for row in order for i in row})
    with Image.open(out) as img:
        assert img.size == GridStyle().canvas_size(2, 2, labelled=True)
    none_found = examples.save(tmp_path / "none.png", g_feats, g_pids, torch.arange(len(paths)),
                               q_feats[:0], keep[:0])
    assert none_found is None and not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("kind", ["official best.pth", "safetensors export", "export with its run config"])
def test_checkpoint_file_search(world: SimpleNamespace, tmp_path: Path, capsys, kind: str) -> None:
    torch.manual_seed(2)
    if kind == "export with its run config":
        # 2 heads on width 32: only the config stored in the file's metadata says so
        model = build_irra(3, cmt_depth=1, **TINY).eval()
        ckpt, size_args = tmp_path / "model.safetensors", []
        cfg = config_from_dict(tiny_run_config(world.shards))
        save_weights_safetensors(model, ckpt, {"config": dump_config(cfg)})
    else:
        # heads = width // 64 (as in every OpenAI CLIP): the tensors alone describe the model
        model = build_irra(3, cmt_depth=1, **{**TINY, "vision_heads": 1, "text_heads": 1}).eval()
        if kind == "official best.pth":
            ckpt, size_args = tmp_path / "best.pth", ["--image-size", "32x16", "--stride-size", "8"]
            export_official_checkpoint(model, ckpt)
        else:
            ckpt, size_args = tmp_path / "model.safetensors", []  # the size is in the file's metadata
            save_weights_safetensors(model, ckpt)
    assert main(["--checkpoint", str(ckpt), *size_args, "--query", QUERIES[1], "--gallery", str(world.shards),
                 "--top-k", "5", "--num-workers", "0"]) == 0
    (rows,) = parse_search_output(capsys.readouterr().out)
    paths = [world.test_images.parent / r["file_path"] for r in world.test_records]
    order, _ = reference_ranking(model, paths, QUERIES[1:], 5)
    assert [r[4] for r in rows] == [world.test_records[i]["file_path"] for i in order[0]]
    assert list((tmp_path / "cache").glob("gallery_*.safetensors")), "the default cache sits next to the file"
    assert (tmp_path / "search_a-woman-wearing-a-long-black-coat.png").is_file()


def test_run_search_uses_best_weights_unless_asked_for_last(world: SimpleNamespace, tmp_path: Path,
                                                            capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    torch.manual_seed(5)
    best = build_irra(3, cmt_depth=1, **TINY).eval()
    save_weights_safetensors(best, run / "best.safetensors")
    paths = [world.test_images.parent / r["file_path"] for r in world.test_records]
    common = ["--run", str(run), "--query", QUERIES[0], "--top-k", "8", "--num-workers", "0"]
    for weights, model in (("best", best), ("last", world.model)):
        assert main([*common, "--weights", weights]) == 0
        (rows,) = parse_search_output(capsys.readouterr().out)
        _, scores = reference_ranking(model, paths, QUERIES[:1], 8)
        assert [r[1] for r in rows] == pytest.approx(scores[0].tolist(), abs=1e-4), weights


def test_launcher_script_runs_main(world: SimpleNamespace, tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("search_launcher", REPO / "launch" / "search.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    assert launcher.main(["--run", str(world.run), "--query", "someone", "--top-k", "2", "--num-workers", "0",
                          "--cache-dir", str(tmp_path), "--out", str(tmp_path / "g.png")]) == 0
    assert len(parse_search_output(capsys.readouterr().out)[0]) == 2


def _bad_inputs(world: SimpleNamespace, tmp: Path) -> dict[str, list[str]]:
    empty = tmp / "empty"
    empty.mkdir()
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "b.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    latin1 = tmp / "latin1.txt"
    latin1.write_bytes("une personne en veste bleue, très grande\n".encode("latin-1"))
    no_weights = tmp / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.yaml").write_text((world.run / "config.yaml").read_text())
    q = ["--query", "a person"]
    run = ["--run", str(world.run), "--cache-dir", str(tmp / "cache"), "--num-workers", "0"]
    return {
        "missing run": ["--run", str(tmp / "nope"), *q],
        "run without weights": ["--run", str(no_weights), *q],
        "missing checkpoint": ["--checkpoint", str(tmp / "nope.safetensors"), *q],
        "empty gallery folder": [*run, "--gallery", str(empty), *q],
        "no readable image": [*run, "--gallery", str(corrupt), *q],
        "queries file not UTF-8": [*run, "--queries-file", str(latin1)],
        "missing gallery": [*run, "--gallery", str(tmp / "nowhere"), *q],
        "split captions need shards": [*run, "--gallery", str(world.test_images),
                                       "--from-split-captions", "2"],
        "pid count mismatch": [*run, *q, "--query-pid", "1", "--query-pid", "2"],
        "no query": [*run],
        "empty query": [*run, "--query", "  "],
        "missing queries file": [*run, "--queries-file", str(tmp / "q.txt")],
        "unknown split": [*run, *q, "--split", "holdout"],
        "bad top-k": [*run, *q, "--top-k", "0"],
    }


BAD_INPUTS = ["missing run", "run without weights", "missing checkpoint", "empty gallery folder",
              "no readable image", "queries file not UTF-8", "missing gallery", "split captions need shards",
              "pid count mismatch", "no query", "empty query", "missing queries file", "unknown split",
              "bad top-k"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(world: SimpleNamespace, tmp_path: Path, capsys, case: str) -> None:
    argv = _bad_inputs(world, tmp_path)[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("irra-search: error: ") and "\n" not in err, err
    if case == "no readable image":
        assert "could be read" in err
    if case == "queries file not UTF-8":
        assert "latin1.txt is not UTF-8" in err and "0xe8" in err  # the è of "très" in Latin-1


def test_unreadable_gallery_images_are_skipped_and_counted(world: SimpleNamespace, tmp_path: Path,
                                                          capsys, caplog) -> None:
    folder = tmp_path / "gallery"
    folder.mkdir()
    paths = sorted(world.test_images.glob("*.jpg"))[:4]
    for path in paths:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "zz_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    argv = ["--run", str(world.run), "--gallery", str(folder), "--query", QUERIES[0], "--top-k", "10",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "g.png"), "--num-workers", "0"]
    for attempt in ("computed", "cached"):
        caplog.clear()
        assert main(argv) == 0, attempt
        (rows,) = parse_search_output(capsys.readouterr().out)
        order, scores = reference_ranking(world.model, paths, QUERIES[:1], 4)
        assert [r[4] for r in rows] == [paths[i].name for i in order[0]]  # the 4 readable ones, ranked
        assert [r[1] for r in rows] == pytest.approx(scores[0].tolist(), abs=1e-4)
        warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
        assert len(warned) == 1 and "skipped 1 unreadable image(s)" in warned[0]
        assert "zz_broken.jpg" in warned[0]


def test_a_query_longer_than_the_model_reads_is_said_once(world: SimpleNamespace, tmp_path: Path, capsys,
                                                         caplog) -> None:
    long_query = " ".join(["red"] * 10_000)
    argv = ["--run", str(world.run), "--query", long_query, "--query", QUERIES[0], "--top-k", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "g.png"), "--num-workers", "0"]
    assert main(argv) == 0
    warned = [r.getMessage() for r in caplog.records if "longer than the model reads" in r.getMessage()]
    # "red" is one BPE token: 77 minus the start and end tokens leaves 75 words
    assert len(warned) == 1 and "1 query/queries" in warned[0] and "first 75 words of query 1" in warned[0]


def test_queries_file_one_per_line(world: SimpleNamespace, tmp_path: Path, capsys) -> None:
    (tmp_path / "q.txt").write_text(f"{QUERIES[0]}\n\n{QUERIES[1]}\n")
    assert main(["--run", str(world.run), "--queries-file", str(tmp_path / "q.txt"), "--top-k", "1",
                 "--num-workers", "0", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "g.png")]) == 0
    assert len(parse_search_output(capsys.readouterr().out)) == 2


def test_default_png_name_is_a_slug_next_to_the_run() -> None:
    home = Path("/runs/x")
    assert search_results.default_out_path(home, ["A Man, in RED!"]) == home / "search_a-man-in-red.png"
    assert search_results.default_out_path(home, ["q1", "q2", "q3"]) == home / "search_q1_and_2_more.png"
    assert search_results.slugify("!!!") == "query"


# --------------------------------------------------------------------------------------------------
# A trained demo model finds the person a query describes
#
# A TRAINED model: the out-of-the-box demo run (tests/conftest.py: demo_run, shared with tests/test_demo.py).
# The queries are test-split captions of distinct people, each written by the generator from that person's
# attributes (clothing colours and types, shoes, bag, hat, hair). Chance is 1 in 100 identities. The demo
# reaches about 75% R1 (R5 about 95%), so the printed top-1 must be the described person for most queries.
DEMO_QUERIES = 50  # half the test identities: a steadier rate than a handful of queries


@pytest.mark.slow
def test_trained_demo_finds_the_described_person(demo_run: tuple[Path, str], tmp_path: Path,
                                                 capsys) -> None:
    run, _ = demo_run
    argv = ["--run", str(run), "--from-split-captions", str(DEMO_QUERIES), "--top-k", "5",
            "--cache-dir", str(tmp_path), "--out", str(tmp_path / "demo.png"), "--num-workers", "0"]
    assert main(argv) == 0
    results = parse_search_output(capsys.readouterr().out)
    assert len(results) == DEMO_QUERIES
    top1 = sum(rows[0][3] == "correct" for rows in results)
    top5 = sum(any(row[3] == "correct" for row in rows) for rows in results)
    assert top1 > DEMO_QUERIES / 2, f"top-1 is the described person for only {top1} of {DEMO_QUERIES}"
    assert top5 >= 0.8 * DEMO_QUERIES, f"top-5 holds the person for only {top5} of {DEMO_QUERIES}"
    with Image.open(tmp_path / "demo.png") as image:
        assert image.format == "PNG"
        # By hand from the layout rules (visualize.py): 128x48 thumbnails in 3 px frames -> 54x134 cells;
        # width 2*8 + 5*54 + 4*6 = 310; a row is 3 text lines (42) + 4 + 134 + 3 label lines (42) = 222;
        # height 2*8 + 50*222 + 49*12 = 11704.
        assert image.size == (310, 11704)
