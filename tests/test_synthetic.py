"""The synthetic demo dataset: layout, counts, determinism; captions and pixels carry the attributes."""

from __future__ import annotations

import colorsys
import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from irra_dist.data.parsers import parse_dataset
from irra_dist.engine.synthetic_cli import main
from irra_dist.synthetic import dataset as synthetic
from irra_dist.synthetic.dataset import DatasetExistsError, generate_synthetic_dataset
from irra_dist.synthetic.render import render_person, sample_attributes

NUM_IDS = {"train": 14, "val": 5, "test": 6}

# The test's own reading of a caption: colour words and the item phrase that follows them.
COLOR_OF_WORD = {
    "red": "red", "crimson": "red", "scarlet": "red", "orange": "orange", "yellow": "yellow",
    "mustard": "yellow", "green": "green", "emerald": "green", "blue": "blue", "cobalt": "blue",
    "purple": "purple", "violet": "purple", "pink": "pink", "brown": "brown", "chocolate": "brown",
    "black": "black", "jet-black": "black", "white": "white", "snow-white": "white", "grey": "grey",
    "gray": "grey", "blonde": "blonde", "blond": "blonde",
}
SLOT_OF_PHRASE = {
    "t-shirt": ("upper", "t-shirt"), "tee": ("upper", "t-shirt"), "short-sleeved shirt": ("upper", "t-shirt"),
    "jacket": ("upper", "jacket"), "zip-up jacket": ("upper", "jacket"), "coat": ("upper", "coat"),
    "long coat": ("upper", "coat"), "overcoat": ("upper", "coat"), "tank top": ("upper", "tank top"),
    "sleeveless top": ("upper", "tank top"), "vest": ("upper", "tank top"),
    "trousers": ("lower", "trousers"), "pants": ("lower", "trousers"), "slacks": ("lower", "trousers"),
    "shorts": ("lower", "shorts"), "skirt": ("lower", "skirt"),
    "shoes": ("shoes", "shoes"), "sneakers": ("shoes", "shoes"),
    "backpack": ("bag", "backpack"), "rucksack": ("bag", "backpack"), "handbag": ("bag", "handbag"),
    "purse": ("bag", "handbag"), "shoulder bag": ("bag", "shoulder bag"),
    "messenger bag": ("bag", "shoulder bag"), "satchel": ("bag", "shoulder bag"),
    "cap": ("hat", "cap"), "baseball cap": ("hat", "cap"), "hat": ("hat", "hat"), "sun hat": ("hat", "hat"),
    "hair": ("hair", "hair"),
}


def read_caption(caption: str) -> dict[str, tuple[str, ...]]:
    """Map each slot to (type, colour) as the caption states it; hair also records its length."""
    words = re.findall(r"[a-z-]+", caption.lower())
    found: dict[str, tuple[str, ...]] = {}
    for i, word in enumerate(words):
        if word not in COLOR_OF_WORD:
            continue
        two, one = " ".join(words[i + 1:i + 3]), " ".join(words[i + 1:i + 2])
        phrase = two if two in SLOT_OF_PHRASE else one
        assert phrase in SLOT_OF_PHRASE, f"colour word {word!r} not followed by an item in {caption!r}"
        slot, kind = SLOT_OF_PHRASE[phrase]
        value = (kind, COLOR_OF_WORD[word]) if slot != "hair" else (words[i - 1], COLOR_OF_WORD[word])
        assert found.setdefault(slot, value) == value, f"{slot} stated twice, differently, in {caption!r}"
    return found


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic_dataset(root / "CUHK-PEDES", num_train_ids=NUM_IDS["train"],
                                      num_val_ids=NUM_IDS["val"], num_test_ids=NUM_IDS["test"],
                                      images_per_id=(2, 4), seed=3)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_parses_as_cuhk_pedes(dataset: Path) -> None:
    assert sorted(p.name for p in dataset.iterdir()) == ["imgs", "reid_raw.json", "synthetic_attributes.json"]
    ds = parse_dataset("CUHK-PEDES", dataset.parent)  # the data root layout
    assert ds.dataset_dir == str(dataset)
    assert ds.num_skipped == 0
    for split, num in NUM_IDS.items():
        ids, images, captions = ds.counts(split)
        assert ids == num
        assert 2 * num <= images <= 4 * num
        assert captions == 2 * images
    assert ds.num_train_ids == NUM_IDS["train"]
    assert sorted({r.pid for r in ds.splits["train"]}) == list(range(NUM_IDS["train"]))


def test_images_per_identity_and_disjoint_ids(dataset: Path) -> None:
    records = json.loads((dataset / "reid_raw.json").read_text())
    ids_by_split: dict[str, set[int]] = {}
    images_by_id: dict[int, int] = {}
    for rec in records:
        ids_by_split.setdefault(rec["split"], set()).add(rec["id"])
        images_by_id[rec["id"]] = images_by_id.get(rec["id"], 0) + 1
    assert ids_by_split["train"].isdisjoint(ids_by_split["val"])
    assert ids_by_split["train"].isdisjoint(ids_by_split["test"])
    assert ids_by_split["val"].isdisjoint(ids_by_split["test"])
    assert all(2 <= n <= 4 for n in images_by_id.values())
    assert len(set(images_by_id.values())) > 1  # the count really varies


def test_image_sizes_like_person_crops(dataset: Path) -> None:
    sizes = [Image.open(p).size for p in (dataset / "imgs").rglob("*.jpg")]
    assert sizes
    assert all(60 <= w <= 160 and 150 <= h <= 400 and h > w for w, h in sizes)
    assert len(set(sizes)) > len(sizes) // 2  # sizes vary from image to image
    with Image.open(next((dataset / "imgs").rglob("*.jpg"))) as image:
        assert image.format == "JPEG" and image.mode == "RGB"


def test_captions_identify_their_person(dataset: Path) -> None:
    ds = parse_dataset("CUHK-PEDES", dataset)
    for split in ("train", "val", "test"):
        stated_by_pid: dict[int, set[tuple]] = {}
        for record in ds.splits[split]:
            assert len(set(record.captions)) == len(record.captions) or len(record.captions) == 1
            for caption in record.captions:
                stated = read_caption(caption)
                assert {"upper", "lower", "shoes", "hair"} <= set(stated), caption
                stated_by_pid.setdefault(record.pid, set()).add(tuple(sorted(stated.items())))
        # Every caption of a person states the same attributes, and no two persons share them.
        assert all(len(s) == 1 for s in stated_by_pid.values()), stated_by_pid
        full_sets = [next(iter(s)) for s in stated_by_pid.values()]
        assert len(set(full_sets)) == len(full_sets)


def test_captions_vary(dataset: Path) -> None:
    captions = [c for r in parse_dataset("CUHK-PEDES", dataset).splits["train"] for c in r.captions]
    openings = {" ".join(c.split()[:2]) for c in captions}
    assert len(openings) >= 5
    assert len(set(captions)) == len(captions)


def _generate_like_fixture(out: Path, seed: int, workers: int = 1) -> Path:
    return generate_synthetic_dataset(out, num_train_ids=NUM_IDS["train"], num_val_ids=NUM_IDS["val"],
                                      num_test_ids=NUM_IDS["test"], images_per_id=(2, 4), seed=seed,
                                      workers=workers)


def test_same_seed_same_bytes(dataset: Path, tmp_path: Path) -> None:
    assert _digest(_generate_like_fixture(tmp_path / "again", seed=3)) == _digest(dataset)
    other = _generate_like_fixture(tmp_path / "other", seed=4)
    assert (other / "reid_raw.json").read_bytes() != (dataset / "reid_raw.json").read_bytes()
    first = sorted((other / "imgs").rglob("*.jpg"))[0]
    assert first.read_bytes() != (dataset / first.relative_to(other)).read_bytes()


@pytest.mark.dist
def test_worker_pool_gives_the_same_bytes(dataset: Path, tmp_path: Path) -> None:
    assert _digest(_generate_like_fixture(tmp_path / "pool", seed=3, workers=2)) == _digest(dataset)


def color_name(rgb: np.ndarray) -> str:
    """Name a colour the way a person would, from hue, saturation and value (the test's own rule)."""
    hue, sat, val = colorsys.rgb_to_hsv(*(float(c) / 255 for c in rgb))
    hue *= 360
    if val < 0.3:
        return "black"
    if sat < 0.2:
        return "white" if val > 0.7 else "grey"
    if hue < 40 or hue >= 345:  # warm hues: dark ones are brown
        if val < 0.55:
            return "brown"
        return "red" if hue < 15 or hue >= 345 else "orange"
    if hue < 70:
        return "yellow"
    if hue < 170:
        return "green"
    if hue < 190:
        return "cyan"
    if hue < 260:
        return "blue"
    if hue < 300:
        return "purple"
    return "pink"


def hair_color_name(rgb: np.ndarray) -> str:
    return {"yellow": "blonde", "orange": "blonde", "white": "grey"}.get(color_name(rgb), color_name(rgb))


def test_pixels_show_the_attributes() -> None:
    rng = random.Random(11)
    checked = {"upper": 0, "lower": 0, "shoes": 0, "bag": 0, "hat": 0, "hair": 0}
    for trial in range(200):
        attrs = sample_attributes(rng)
        image, boxes = render_person(attrs, random.Random(trial))
        pixels = np.asarray(image, dtype=np.float64)
        expected = {"upper": attrs.upper_color, "lower": attrs.lower_color, "shoes": attrs.shoes_color,
                    "bag": attrs.bag_color, "hat": attrs.hat_color, "hair": attrs.hair_color}
        assert ("bag" in boxes) == (attrs.bag_type != "none")
        assert ("hat" in boxes) == (attrs.hat_type != "none")
        for part, (x0, y0, x1, y1) in boxes.items():
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height, (part, boxes[part])
            median = np.median(pixels[y0:y1 + 1, x0:x1 + 1].reshape(-1, 3), axis=0)
            name = hair_color_name(median) if part == "hair" else color_name(median)
            assert name == expected[part], (trial, part, attrs, median)
            checked[part] += 1
        # At a tiny model's input size the big clothing regions keep their colour.
        small = np.asarray(image.resize((48, 128), Image.Resampling.BILINEAR), dtype=np.float64)
        for part in ("upper", "lower"):
            x0, y0, x1, y1 = boxes[part]
            sx, sy = 48 / image.width, 128 / image.height
            region = small[int(y0 * sy):int(y1 * sy) + 1, int(x0 * sx):int(x1 * sx) + 1]
            median = np.median(region.reshape(-1, 3), axis=0)
            assert color_name(median) == expected[part], (trial, part, attrs, median)
    assert all(n > 5 for n in checked.values()), checked


def test_attribute_keys_unique_and_recorded(dataset: Path) -> None:
    meta = json.loads((dataset / "synthetic_attributes.json").read_text())
    keys = [tuple(v for k, v in person.items() if k not in ("split", "skin_tone"))
            for person in meta["identities"].values()]
    assert len(keys) == sum(NUM_IDS.values()) == len(set(keys))
    # The recorded attributes are the ones the captions state.
    ds = parse_dataset("CUHK-PEDES", dataset)
    record = ds.splits["test"][0]
    person = meta["identities"][str(record.pid)]
    stated = read_caption(record.captions[0])
    assert stated["upper"] == (person["upper_type"], person["upper_color"])
    assert stated["lower"] == (person["lower_type"], person["lower_color"])
    assert stated["hair"] == (person["hair_length"], person["hair_color"])


def test_existing_output_and_overwrite(tmp_path: Path) -> None:
    out = generate_synthetic_dataset(tmp_path / "ds", num_train_ids=2, num_val_ids=0, num_test_ids=1)
    with pytest.raises(DatasetExistsError, match="already exists.*--overwrite"):
        generate_synthetic_dataset(out, num_train_ids=3, num_val_ids=0, num_test_ids=1)
    generate_synthetic_dataset(out, num_train_ids=3, num_val_ids=0, num_test_ids=1, overwrite=True)
    assert parse_dataset("CUHK-PEDES", out).num_train_ids == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary folder left behind
    (tmp_path / "plain").mkdir()  # the output gets ordinary folder permissions, not mkdtemp's 0700
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_crash_leaves_no_complete_looking_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_render(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return render_person(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_person", failing_render)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_synthetic_dataset(tmp_path / "ds", num_train_ids=4, num_val_ids=0, num_test_ids=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, expected", [
    ({"num_train_ids": 0}, "num_train_ids >= 1"),
    ({"num_test_ids": -1}, "num_val_ids, num_test_ids >= 0"),
    ({"images_per_id": (3, 2)}, "images_per_id"),
    ({"images_per_id": 0}, "images_per_id"),
    ({"workers": 0}, "workers must be >= 1"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        generate_synthetic_dataset(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


def test_command_line(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--train-ids", "3", "--val-ids", "1", "--test-ids", "2",
                 "--images-per-id", "1", "2", "--seed", "5"]) == 0
    ds = parse_dataset("CUHK-PEDES", out)
    assert [ds.counts(s)[0] for s in ("train", "val", "test")] == [3, 1, 2]
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--train-ids", "3"])  # exists, no --overwrite


def test_identities_never_share_attributes_even_when_draws_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    # Shrink the attribute space to three people so that collisions are certain.
    people = [sample_attributes(random.Random(i)) for i in range(3)]
    monkeypatch.setattr(synthetic, "sample_attributes", lambda rng: rng.choice(people))
    drawn = synthetic._unique_attributes(3, random.Random(0))
    assert sorted(p.key for p in drawn) == sorted(p.key for p in people)
    with pytest.raises(ValueError, match="could not draw 4 identities with unique attributes"):
        synthetic._unique_attributes(4, random.Random(0))
