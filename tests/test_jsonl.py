"""The JSON-lines format for users' own data: parsing, identity remapping, carving and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from irra_dist.data.jsonl import parse_jsonl
from irra_dist.data.parsers import DatasetError, DatasetNotFoundError, carve_identities


def _image(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 32), color).save(path)


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Images in nested folders, PNG and JPEG."""
    root = tmp_path / "photos"
    for i, name in enumerate(["cam1/a.jpg", "cam1/b.png", "cam2/day/c.jpg", "cam2/d.png", "e.jpg", "f.png"]):
        _image(root / name, (40 * i, 255 - 40 * i, 90))
    return root


def test_parses_nested_images_string_pids_and_splits(photos: Path, tmp_path: Path) -> None:
    ann = _write(tmp_path / "data.jsonl", [
        {"image": "cam1/a.jpg", "captions": ["a man in blue", "blue shirt"], "pid": "bob"},
        {"image": "cam1/b.png", "captions": "a woman in red", "pid": "ann"},
        "",  # blank lines are allowed
        {"image": "cam2/day/c.jpg", "captions": ["bob again"], "pid": "bob"},
        {"image": "cam2/d.png", "captions": ["someone"], "pid": 7, "split": "test"},
        {"image": "e.jpg", "captions": ["another"], "pid": "7", "split": "test"},
        {"image": "f.png", "captions": ["val person"], "pid": "zed", "split": "val"},
    ])
    parsed = parse_jsonl(ann, photos)
    train = parsed.splits["train"]
    # Train pids are contiguous in order of first appearance: bob -> 0, ann -> 1.
    assert [(r.rel_path, r.pid, r.captions) for r in train] == [
        ("cam1/a.jpg", 0, ("a man in blue", "blue shirt")),
        ("cam1/b.png", 1, ("a woman in red",)),
        ("cam2/day/c.jpg", 0, ("bob again",)),
    ]
    assert [r.image_id for r in train] == [0, 1, 2]
    assert train[2].path == str(photos / "cam2/day/c.jpg")
    # 7 and "7" name one identity.
    assert [(r.rel_path, r.pid) for r in parsed.splits["test"]] == [("cam2/d.png", 0), ("e.jpg", 0)]
    assert [r.rel_path for r in parsed.splits["val"]] == ["f.png"]
    assert parsed.num_train_ids == 2 and parsed.identities == "given"
    assert parsed.counts("train") == (2, 3, 4)


def test_without_pids_every_image_is_its_own_identity(photos: Path, tmp_path: Path) -> None:
    ann = _write(tmp_path / "d.jsonl", [{"image": "cam1/a.jpg", "captions": ["x"]},
                                        {"image": "cam1/b.png", "captions": ["y", "z"]}])
    parsed = parse_jsonl(ann, photos)
    assert [r.pid for r in parsed.splits["train"]] == [0, 1]
    assert parsed.identities == "per_image" and parsed.num_train_ids == 2


def test_carving_moves_whole_identities_deterministically(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    lines = []
    for person in range(20):
        for shot in range(3):
            _image(root / f"p{person}/{shot}.png", (person * 10, shot * 50, 0))
            lines.append({"image": f"p{person}/{shot}.png", "captions": [f"person {person}"],
                          "pid": f"p{person}"})
    ann = _write(tmp_path / "a.jsonl", lines)
    first = parse_jsonl(ann, root, val_ids=3, test_ids=4, check_images=False)
    by_split = {s: {r.rel_path.split("/")[0] for r in recs} for s, recs in first.splits.items()}
    assert len(by_split["val"]) == 3 and len(by_split["test"]) == 4 and len(by_split["train"]) == 13
    assert not (by_split["val"] & by_split["test"]) and not (by_split["train"] & by_split["val"])
    assert all(len(recs) == 3 * len(by_split[s]) for s, recs in first.splits.items())  # whole identities
    # The same carve from shuffled lines: the choice depends on the identities, not on the order.
    _write(ann, lines[::-1])
    again = parse_jsonl(ann, root, val_ids=3, test_ids=4, check_images=False)
    assert {s: {r.rel_path.split("/")[0] for r in recs} for s, recs in again.splits.items()} == by_split
    assert first.num_train_ids == 13
    with pytest.raises(DatasetError, match="cannot carve 30"):
        carve_identities(list(range(20)), 30, "val")


@pytest.mark.parametrize("line, problem", [
    ({"image": "cam1/a.jpg", "captions": []}, "has no captions"),
    ({"image": "cam1/a.jpg", "captions": ["  "]}, "has no captions"),
    ({"image": "cam1/a.jpg"}, "'captions' must be"),
    ({"image": "missing.jpg", "captions": ["x"]}, "does not exist"),
    ({"image": "not_an_image.jpg", "captions": ["x"]}, "cannot be read"),
    ({"image": "../outside.png", "captions": ["x"]}, "leaves the images folder"),
    ({"image": "link.png", "captions": ["x"]}, "leaves the images folder"),
    ({"captions": ["x"]}, "has no 'image'"),
    ('{"image": "cam1/a.jpg", "captions": ["x"]', "is not valid JSON"),
    ([1, 2], "not an object"),
    ({"image": "cam1/a.jpg", "captions": ["x"], "split": "dev"}, "'split' 'dev'"),
    ({"image": "cam1/a.jpg", "captions": ["x"], "pid": 1.5}, "'pid' 1.5"),
])
def test_bad_line_names_file_and_line(photos: Path, tmp_path: Path, line, problem: str) -> None:
    (photos / "not_an_image.jpg").write_text("this is text")
    _image(tmp_path / "outside.png", (1, 2, 3))
    (photos / "link.png").symlink_to(tmp_path / "outside.png")
    good = {"image": "cam1/b.png", "captions": ["fine"]}
    ann = _write(tmp_path / "bad.jsonl", [good, good, line, good])
    with pytest.raises(DatasetError) as err:
        parse_jsonl(ann, photos)
    message = str(err.value)
    assert message.startswith(f"{ann}:3: ") and problem in message and "\n" not in message
    # --skip-bad skips and counts that line only.
    parsed = parse_jsonl(ann, photos, skip_bad=True)
    assert parsed.num_skipped == 1 and len(parsed.splits["train"]) == 3


def test_mixed_pid_presence_and_missing_paths(photos: Path, tmp_path: Path) -> None:
    ann = _write(tmp_path / "m.jsonl", [{"image": "cam1/a.jpg", "captions": ["x"], "pid": 1},
                                        {"image": "cam1/b.png", "captions": ["y"]}])
    with pytest.raises(DatasetError, match="on some lines but not on others"):
        parse_jsonl(ann, photos)
    with pytest.raises(DatasetNotFoundError, match="--ann"):
        parse_jsonl(tmp_path / "nope.jsonl", photos)
    with pytest.raises(DatasetNotFoundError, match="--images"):
        parse_jsonl(ann, tmp_path / "nope")


# --------------------------------------------------------------------------------------------------
# From a folder of photos to a trained model and a search, as the README shows


def _person_photos(root: Path, people: int, shots: int) -> list[dict]:
    """Nested folders, PNG and JPEG alternating, string pids, two captions per image; each person has a
    colour of their own, named in the captions, so retrieval is learnable."""
    import numpy as np

    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "purple": (140, 30, 160), "orange": (250, 140, 20), "white": (245, 245, 245),
           "black": (15, 15, 15)}
    lines = []
    for person in range(people):
        colour = colours[person % len(colours)]
        for shot in range(shots):
            rel = f"camera{shot % 2}/day{person % 3}/{colour}_{person}_{shot}.{'png' if shot % 2 else 'jpg'}"
            pixels = np.clip(np.asarray(rgb[colour]) + rng.integers(-20, 20, (64, 32, 3)), 0, 255)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype("uint8")).save(root / rel)
            lines.append({"image": rel, "captions": [f"a person dressed in {colour}", f"{colour} clothes"],
                          "pid": f"person-{person}"})
    return lines


def test_own_photos_build_train_evaluate_and_search(tmp_path: Path, tiny_recipe: Path, fresh_accelerate,
                                                    capsys) -> None:
    from conftest import reset_accelerate

    from irra_dist.config import load_config
    from irra_dist.data.shards import MANIFEST_NAME
    from irra_dist.engine.build_shards_cli import main as build_main
    from irra_dist.engine.cli import evaluate_main
    from irra_dist.engine.search_cli import main as search_main
    from irra_dist.engine.trainer import train

    photos = tmp_path / "photos"
    ann = _write(tmp_path / "data.jsonl", _person_photos(photos, people=8, shots=4))
    out = tmp_path / "shards"
    assert build_main(["--dataset", "jsonl", "--ann", str(ann), "--images", str(photos), "--out", str(out),
                       "--test-ids", "3", "--workers", "1", "--no-progress"]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["num_train_ids"] == 5 and manifest["identities"] == "given"
    assert manifest["splits"]["test"]["num_images"] == 12
    assert manifest["splits"]["train"]["num_captions"] == 40

    run = train(load_config(tiny_recipe, [f"data.shards={out}", "train.run_name=own", "train.batch_size=8",
                                          "train.num_epochs=2"]))
    assert (run / "model.safetensors").is_file()
    reset_accelerate()
    capsys.readouterr()
    assert evaluate_main([str(run), "--num-workers", "0", "--out", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]["t2i"]
    assert 0 <= metrics["R1"] <= 100 and metrics["R10"] == 100.0  # 12 test images: top 10 of 12 always hit
    capsys.readouterr()
    assert search_main(["--run", str(run), "--query", "a person dressed in red", "--top-k", "3",
                        "--num-workers", "0", "--out", str(tmp_path / "s.png")]) == 0
    printed = capsys.readouterr().out
    # The table lists three hits, all gallery images of the test split (the same carve, parsed again).
    test_images = {r.rel_path for r in parse_jsonl(ann, photos, test_ids=3).splits["test"]}
    hits = [w for w in printed.split() if w.endswith((".jpg", ".png")) and "/" in w and not w.startswith("/")]
    assert (tmp_path / "s.png").is_file() and len(hits) == 3 and set(hits) <= test_images


def test_bad_jsonl_input_exits_2_with_one_line_and_writes_no_manifest(photos: Path, tmp_path: Path,
                                                                       capsys) -> None:
    from irra_dist.data.shards import MANIFEST_NAME
    from irra_dist.engine.build_shards_cli import main as build_main

    ann = _write(tmp_path / "bad.jsonl", [{"image": "cam1/a.jpg", "captions": ["x"], "pid": 1},
                                          {"image": "nowhere/z.png", "captions": ["y"], "pid": 2}])
    out = tmp_path / "out"
    capsys.readouterr()
    assert build_main(["--dataset", "jsonl", "--ann", str(ann), "--images", str(photos), "--out", str(out),
                       "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{ann}:2:" in err and "does not exist" in err
    assert not (out / MANIFEST_NAME).exists()
    # Without --ann the command says what it needs (argparse: exit 2).
    with pytest.raises(SystemExit) as stop:
        build_main(["--dataset", "jsonl", "--images", str(photos)])
    assert stop.value.code == 2


def test_without_pids_the_trainer_turns_the_id_loss_off(photos: Path, tmp_path: Path, tiny_recipe: Path,
                                                         fresh_accelerate) -> None:
    from irra_dist.config import load_config
    from irra_dist.engine.build_shards_cli import main as build_main
    from irra_dist.engine.runlog import read_metrics
    from irra_dist.engine.trainer import train

    lines = [{"image": p, "captions": [f"photo {i}", f"picture {i}"]}
             for i, p in enumerate(["cam1/a.jpg", "cam1/b.png", "cam2/day/c.jpg", "cam2/d.png", "e.jpg",
                                    "f.png"])]
    ann = _write(tmp_path / "noid.jsonl", lines)
    out = tmp_path / "shards"
    assert build_main(["--dataset", "jsonl", "--ann", str(ann), "--images", str(photos), "--out", str(out),
                       "--test-ids", "2", "--workers", "1", "--no-progress"]) == 0
    run = train(load_config(tiny_recipe, [f"data.shards={out}", "train.run_name=noid", "train.batch_size=4"]))
    log = (run / "train_log.txt").read_text()
    assert "has no identities" in log and "ID loss is turned off" in log
    train_rows = [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"]
    assert train_rows and all("id_loss" not in r for r in train_rows) and "sdm_loss" in train_rows[0]
    assert load_config(run / "config.yaml").loss.names == ["sdm", "mlm"]
