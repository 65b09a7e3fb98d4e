"""irra-build-shards --val-ids N: whole training identities carved into a val split (ICFG-PEDES has none),
deterministically and recorded in the manifest; a val-selected run refuses shards without val images."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from irra_dist.data.shards import RecordReader, SplitIndex, load_manifest
from irra_dist.engine.build_shards_cli import main as build_main

NUM_TRAIN_IDS, IMAGES_PER_ID, CARVED = 10, 2, 3


def _icfg_dataset(root: Path) -> Path:
    """An ICFG-PEDES-format dataset (train pid = id, no val split): 10 train ids x 2 images, 2 test ids."""
    folder = root / "ICFG-PEDES"
    records = [{"split": "train", "id": i, "file_path": f"train/{i}_{k}.png", "captions": [f"person {i} {k}"]}
               for i in range(NUM_TRAIN_IDS) for k in range(IMAGES_PER_ID)]
    records += [{"split": "test", "id": i, "file_path": f"test/{i}_{k}.png", "captions": [f"test {i}"]}
                for i in (3200, 3201) for k in range(2)]
    for rec in records:
        path = folder / "imgs" / rec["file_path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 16), (rec["id"] % 256, 0, 0)).save(path)
    (folder / "ICFG-PEDES.json").write_text(json.dumps(records))
    return root


def _build(root: Path, out: Path, *extra: str) -> int:
    return build_main(["--dataset", "ICFG-PEDES", "--root", str(root), "--out", str(out), "--workers", "1",
                       "--no-progress", *extra])


def _id_of(record_json: dict) -> int:
    return int(re.match(r"train/(\d+)_", record_json["rel_path"]).group(1))


def test_val_ids_carve_whole_identities_deterministically(tmp_path: Path) -> None:
    root = _icfg_dataset(tmp_path / "data")
    assert _build(root, tmp_path / "a", "--val-ids", str(CARVED)) == 0
    assert _build(root, tmp_path / "b", "--val-ids", str(CARVED)) == 0
    manifest = load_manifest(tmp_path / "a")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    # The documented rule, computed here: the ids with the smallest sha256("irra_dist-val:<id>").
    expected = sorted(sorted(range(NUM_TRAIN_IDS),
                             key=lambda i: hashlib.sha256(f"irra_dist-val:{i}".encode()).digest())[:CARVED])
    assert manifest["val_from_train"]["num_ids"] == CARVED and manifest["val_from_train"]["ids"] == expected
    splits = manifest["splits"]
    assert (splits["val"]["num_ids"], splits["val"]["num_images"]) == (CARVED, CARVED * IMAGES_PER_ID)
    kept = [i for i in range(NUM_TRAIN_IDS) if i not in expected]
    assert splits["train"]["num_ids"] == len(kept)
    assert splits["train"]["num_images"] == len(kept) * IMAGES_PER_ID
    assert manifest["num_train_ids"] == len(kept)
    for split in ("train", "val"):
        index = SplitIndex.load(tmp_path / "a", manifest, split)
        reader = RecordReader(index)
        for record in range(len(index)):
            ident = _id_of(reader.read_json(record))
            # val keeps the annotation id as pid; train pids are renumbered 0..M-1 in id order
            assert index.pid[record] == (ident if split == "val" else kept.index(ident))
        reader.close()
        assert sorted(index.image_id.tolist()) == list(range(len(index)))


def test_official_build_has_no_val_and_the_val_ids_flag_refuses_a_dataset_with_one(tmp_path: Path,
                                                                                     capsys) -> None:
    root = _icfg_dataset(tmp_path / "data")
    assert _build(root, tmp_path / "full") == 0
    manifest = load_manifest(tmp_path / "full")
    assert manifest["val_from_train"] is None and manifest["splits"]["val"]["num_images"] == 0
    assert manifest["num_train_ids"] == NUM_TRAIN_IDS
    # CUHK-PEDES has its own val split: --val-ids is refused in one line, nothing written
    from irra_dist.synthetic.dataset import generate_synthetic_dataset

    generate_synthetic_dataset(tmp_path / "cuhk" / "CUHK-PEDES", num_train_ids=3, num_val_ids=1,
                               num_test_ids=1, images_per_id=(1, 1), captions_per_image=1, seed=0)
    capsys.readouterr()
    assert build_main(["--dataset", "CUHK-PEDES", "--root", str(tmp_path / "cuhk"), "--out",
                       str(tmp_path / "cuhk_out"), "--val-ids", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already has a val split" in err
    assert not (tmp_path / "cuhk_out").exists()


@pytest.mark.usefixtures("fresh_accelerate")
def test_val_selection_on_shards_without_val_stops_before_the_run_folder(tmp_path: Path, capsys) -> None:
    from conftest import TINY_RECIPE

    from irra_dist.engine.cli import train_main

    root = _icfg_dataset(tmp_path / "data")
    assert _build(root, tmp_path / "full") == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        **TINY_RECIPE, "data": {"num_workers": 0, "shards": str(tmp_path / "full")},
        "eval": {**TINY_RECIPE["eval"], "split": "val"},
        "train": {**TINY_RECIPE["train"], "output_dir": str(tmp_path / "runs")}}))
    capsys.readouterr()
    assert train_main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--val-ids" in err and "eval.split=test" in err
    assert not (tmp_path / "runs").exists()
