"""Annotation parsers: the three official formats, their quirks, and bad-record reporting (IRRA_SPEC 3.1)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from irra_dist.data.parsers import (
    DatasetError,
    DatasetNotFoundError,
    ImageRecord,
    canonical_dataset_name,
    parse_dataset,
)


def _write_dataset(folder: Path, annotation_name: str, records: list, images: bool = True) -> Path:
    """Write an annotation file plus a tiny image for every string path found in the records."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / annotation_name).write_text(json.dumps(records))
    if images:
        for rec in records:
            rel = rec.get("file_path", rec.get("img_path")) if isinstance(rec, dict) else None
            if isinstance(rel, str) and rel:
                path = folder / "imgs" / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (4, 8), (200, 10, 10)).save(path)
    (folder / "imgs").mkdir(exist_ok=True)
    return folder


def _cuhk_records() -> list[dict]:
    # Interleaved splits, as in the real reid_raw.json; ids are 1-based on the train split.
    return [
        {"split": "train", "id": 2, "file_path": "CUHK01/a.png", "captions": ["c1", "c2"],
         "processed_tokens": [["c1"], ["c2"]]},
        {"split": "test", "id": 7, "file_path": "test_query/b.jpg", "captions": ["t1", "t2", "t3"],
         "processed_tokens": []},
        {"split": "train", "id": 1, "file_path": "CUHK01/c.png", "captions": ["c3"],
         "processed_tokens": []},
        {"split": "val", "id": 9, "file_path": "cam_a/d.bmp", "captions": ["v1", "v2"],
         "processed_tokens": []},
        {"split": "train", "id": "2", "file_path": "CUHK02/e.png", "captions": ["c4", "c5"],
         "processed_tokens": []},
        {"split": "test", "id": 7, "file_path": "test_query/f.jpg", "captions": ["t4"],
         "processed_tokens": []},
        {"split": "test", "id": 8, "file_path": "test_query/g.jpg", "captions": ["t5", "t6"],
         "processed_tokens": []},
    ]


@pytest.fixture
def cuhk_root(tmp_path: Path) -> Path:
    _write_dataset(tmp_path / "CUHK-PEDES", "reid_raw.json", _cuhk_records())
    return tmp_path


def test_cuhk_records_pids_and_image_ids(cuhk_root: Path) -> None:
    ds = parse_dataset("CUHK-PEDES", cuhk_root)
    folder = (cuhk_root / "CUHK-PEDES").absolute()
    assert ds.name == "CUHK-PEDES"
    assert ds.dataset_dir == str(folder)
    assert ds.annotation_path == str(folder / "reid_raw.json")
    assert ds.annotation_sha256 == hashlib.sha256((folder / "reid_raw.json").read_bytes()).hexdigest()
    # Train pid = id - 1 (the string "2" is read as an int); image_id counts per split in file order.
    assert ds.splits["train"] == [
        ImageRecord(0, 1, "CUHK01/a.png", str(folder / "imgs" / "CUHK01/a.png"), ("c1", "c2")),
        ImageRecord(1, 0, "CUHK01/c.png", str(folder / "imgs" / "CUHK01/c.png"), ("c3",)),
        ImageRecord(2, 1, "CUHK02/e.png", str(folder / "imgs" / "CUHK02/e.png"), ("c4", "c5")),
    ]
    # Test and val pids are not shifted.
    assert [(r.image_id, r.pid, r.rel_path) for r in ds.splits["test"]] == [
        (0, 7, "test_query/b.jpg"), (1, 7, "test_query/f.jpg"), (2, 8, "test_query/g.jpg")]
    assert [(r.image_id, r.pid) for r in ds.splits["val"]] == [(0, 9)]
    assert ds.num_train_ids == 2
    assert ds.num_skipped == 0 and ds.skipped_reasons == []


def test_counts_table_and_samples(cuhk_root: Path) -> None:
    ds = parse_dataset("cuhk", cuhk_root)
    assert ds.counts("train") == (2, 3, 5)
    assert ds.counts("test") == (2, 3, 6)
    assert ds.counts("val") == (1, 1, 2)
    lines = ds.table().splitlines()
    assert len(lines) == 7 and lines[0] == lines[2] == lines[-1] and set(lines[0]) == {"+", "-"}
    assert lines[1].split("|")[1:-1] == [" subset ", " ids ", " images ", " captions "]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[3:6]]
    assert rows == [["train", "2", "3", "5"], ["test", "2", "3", "6"], ["val", "1", "1", "2"]]
    folder = str((cuhk_root / "CUHK-PEDES" / "imgs").absolute())
    assert ds.train_samples() == [
        (1, 0, f"{folder}/CUHK01/a.png", "c1"), (1, 0, f"{folder}/CUHK01/a.png", "c2"),
        (0, 1, f"{folder}/CUHK01/c.png", "c3"),
        (1, 2, f"{folder}/CUHK02/e.png", "c4"), (1, 2, f"{folder}/CUHK02/e.png", "c5"),
    ]
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        ds.counts("dev")


def test_gallery_has_each_image_once_and_queries_every_caption(cuhk_root: Path) -> None:
    ds = parse_dataset("CUHK-PEDES", cuhk_root)
    pids, paths = ds.gallery("test")
    assert pids == [7, 7, 8]
    assert [Path(p).name for p in paths] == ["b.jpg", "f.jpg", "g.jpg"]
    # The first test image has 3 captions: 3 queries, 1 gallery entry.
    q_pids, captions = ds.queries("test")
    assert q_pids == [7, 7, 7, 7, 8, 8]
    assert captions == ["t1", "t2", "t3", "t4", "t5", "t6"]


def test_root_may_be_the_dataset_folder_itself(cuhk_root: Path) -> None:
    via_data_root = parse_dataset("CUHK-PEDES", cuhk_root)
    via_folder = parse_dataset("CUHK-PEDES", cuhk_root / "CUHK-PEDES")
    assert via_folder.splits == via_data_root.splits


@pytest.mark.parametrize("file_name", ["ICFG-PEDES.json", "ICFG_PEDES.json"])
def test_icfg_file_names_no_val_and_unshifted_pids(tmp_path: Path, file_name: str) -> None:
    records = [
        {"split": "train", "id": 0, "file_path": "train/0/a.jpg", "captions": ["x"]},
        {"split": "test", "id": 3200, "file_path": "test/3200/b.jpg", "captions": ["y"]},
        {"split": "train", "id": 1, "file_path": "train/1/c.jpg", "captions": ["z"]},
    ]
    _write_dataset(tmp_path / "ICFG-PEDES", file_name, records)
    ds = parse_dataset("icfg-pedes", tmp_path)
    assert ds.name == "ICFG-PEDES"
    assert Path(ds.annotation_path).name == file_name
    assert [r.pid for r in ds.splits["train"]] == [0, 1]
    assert [r.pid for r in ds.splits["test"]] == [3200]
    assert ds.splits["val"] == [] and ds.counts("val") == (0, 0, 0)


def test_rstpreid_img_path_and_split_rule(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = [
        {"split": "train", "id": 0, "img_path": "0000_c1_0001.jpg", "captions": ["a", "b"]},
        {"split": "val", "id": 3702, "img_path": "3702_c2_0001.jpg", "captions": ["c", "d"]},
        {"split": "dev", "id": 3703, "img_path": "3703_c3_0001.jpg", "captions": ["e", "f"]},
        {"split": "TRAIN", "id": 3704, "img_path": "3704_c4_0001.jpg", "captions": ["g", "h"]},
        {"split": "test", "id": 3900, "img_path": "3900_c5_0001.jpg", "captions": ["i", "j"]},
    ]
    _write_dataset(tmp_path / "RSTPReid", "data_captions.json", records)
    with caplog.at_level(logging.WARNING, logger="irra_dist.data.parsers"):
        ds = parse_dataset("RSTPREID", tmp_path / "RSTPReid")
    assert ds.name == "RSTPReid"
    assert [r.rel_path for r in ds.splits["train"]] == ["0000_c1_0001.jpg"]
    # 'val' and any other string (case-sensitive, as in the official code) go to val.
    assert [(r.image_id, r.pid) for r in ds.splits["val"]] == [(0, 3702), (1, 3703), (2, 3704)]
    assert [r.pid for r in ds.splits["test"]] == [3900]
    assert "dev" in caplog.text and "TRAIN" in caplog.text


@pytest.mark.parametrize("alias, canonical", [
    ("cuhk", "CUHK-PEDES"), ("CUHK-PEDES", "CUHK-PEDES"), ("cuhk-pedes", "CUHK-PEDES"),
    ("icfg", "ICFG-PEDES"), ("ICFG-pedes", "ICFG-PEDES"), ("rstp", "RSTPReid"), ("RSTPReid", "RSTPReid"),
    ("rstpreid", "RSTPReid"),
])
def test_names_and_aliases(alias: str, canonical: str) -> None:
    assert canonical_dataset_name(alias) == canonical


def test_unknown_name() -> None:
    with pytest.raises(DatasetError, match="unknown dataset name 'market1501'"):
        canonical_dataset_name("market1501")


def test_train_pids_must_be_contiguous(tmp_path: Path) -> None:
    records = [
        {"split": "train", "id": 1, "file_path": "a.png", "captions": ["x"]},
        {"split": "train", "id": 2, "file_path": "b.png", "captions": ["x"]},
        {"split": "train", "id": 5, "file_path": "c.png", "captions": ["x"]},
    ]
    _write_dataset(tmp_path, "reid_raw.json", records)
    # pids {0, 1, 4}: 0..2 expected, 2 missing, 4 out of range.
    with pytest.raises(DatasetError, match=r"missing \[2\], out of range \[4\]") as err:
        parse_dataset("CUHK-PEDES", tmp_path)
    assert "\n" not in str(err.value) and "pid = id - 1" in str(err.value)


def test_cuhk_id_zero_is_out_of_range(tmp_path: Path) -> None:
    records = [{"split": "train", "id": 0, "file_path": "a.png", "captions": ["x"]}]
    _write_dataset(tmp_path, "reid_raw.json", records)
    with pytest.raises(DatasetError, match=r"out of range \[-1\]"):
        parse_dataset("CUHK-PEDES", tmp_path)


_GOOD = {"split": "train", "id": 1, "file_path": "good.png", "captions": ["fine"]}


@pytest.mark.parametrize("bad, expected", [
    ({"split": "train", "file_path": "bad.png", "captions": ["x"]}, "misses field(s) 'id'"),
    ({"split": "train", "id": 1, "captions": ["x"]}, "misses field(s) 'file_path'"),
    ({"id": 1, "file_path": "bad.png"}, "misses field(s) 'split', 'captions'"),
    ({"split": "train", "id": "seven", "file_path": "bad.png", "captions": ["x"]},
     "'id' 'seven', not an integer"),
    ({"split": "train", "id": 1.5, "file_path": "bad.png", "captions": ["x"]}, "'id' 1.5, not an integer"),
    ({"split": "train", "id": True, "file_path": "bad.png", "captions": ["x"]}, "'id' True, not an integer"),
    ({"split": "train", "id": 1, "file_path": "bad.png", "captions": "a caption"}, "not a list of strings"),
    ({"split": "train", "id": 1, "file_path": "bad.png", "captions": ["ok", 3]}, "not a list of strings"),
    ({"split": "train", "id": 1, "file_path": "bad.png", "captions": None}, "not a list of strings"),
    ({"split": "train", "id": 1, "file_path": 42, "captions": ["x"]},
     "'file_path' 42, not a non-empty string"),
    ({"split": "train", "id": 1, "file_path": "/abs/bad.png", "captions": ["x"]}, "absolute 'file_path'"),
    ({"split": 1, "id": 1, "file_path": "bad.png", "captions": ["x"]}, "'split' 1, not a string"),
    (["train", 1, "bad.png"], "is a list, not a mapping"),
])
def test_bad_record_reported_or_skipped(tmp_path: Path, bad: object, expected: str) -> None:
    _write_dataset(tmp_path, "reid_raw.json", [_GOOD, bad, _GOOD])
    with pytest.raises(DatasetError) as err:
        parse_dataset("CUHK-PEDES", tmp_path)
    message = str(err.value)
    assert "record 1 " in message and expected in message and "--skip-bad" in message
    assert "\n" not in message
    ds = parse_dataset("CUHK-PEDES", tmp_path, skip_bad=True)
    assert ds.num_skipped == 1 and len(ds.skipped_reasons) == 1
    assert "record 1 " in ds.skipped_reasons[0] and expected in ds.skipped_reasons[0]
    # The good records around it are kept, with contiguous image ids.
    assert [(r.image_id, r.rel_path) for r in ds.splits["train"]] == [(0, "good.png"), (1, "good.png")]


def test_missing_image_reported_skipped_or_unchecked(tmp_path: Path) -> None:
    records = [_GOOD, {"split": "test", "id": 4, "file_path": "gone/x.jpg", "captions": ["x"]}, _GOOD]
    _write_dataset(tmp_path, "reid_raw.json", records)
    (tmp_path / "imgs" / "gone" / "x.jpg").unlink()
    with pytest.raises(DatasetError, match=r"record 1 \(path 'gone/x.jpg'\).*does not exist.*--skip-bad"):
        parse_dataset("CUHK-PEDES", tmp_path)
    ds = parse_dataset("CUHK-PEDES", tmp_path, skip_bad=True)
    assert ds.num_skipped == 1 and ds.splits["test"] == []
    ds = parse_dataset("CUHK-PEDES", tmp_path, check_images=False)
    assert ds.num_skipped == 0 and [r.rel_path for r in ds.splits["test"]] == ["gone/x.jpg"]


def test_skip_count_with_several_bad_records(tmp_path: Path) -> None:
    records = [_GOOD, {"split": "train"}, {"split": "test", "id": 3, "file_path": "t.png", "captions": [1]},
               {"split": "test", "id": 3, "file_path": "t.png", "captions": ["ok"]}, 17]
    _write_dataset(tmp_path, "reid_raw.json", records)
    ds = parse_dataset("CUHK-PEDES", tmp_path, skip_bad=True)
    assert ds.num_skipped == 3
    assert [reason.split(" (")[0] for reason in ds.skipped_reasons] == [
        "CUHK-PEDES record 1", "CUHK-PEDES record 2", "CUHK-PEDES record 4"]
    assert ds.counts("train") == (1, 1, 1) and ds.counts("test") == (1, 1, 1)


def test_empty_caption_lists_are_kept_as_the_official_code_keeps_them(tmp_path: Path) -> None:
    records = [
        {"split": "train", "id": 1, "file_path": "a.png", "captions": ["c1", "c2"]},
        {"split": "train", "id": 2, "file_path": "b.png", "captions": []},  # the only image of pid 1
        {"split": "train", "id": 1, "file_path": "c.png", "captions": ["c3"]},
        {"split": "test", "id": 7, "file_path": "d.jpg", "captions": ["t1"]},
        {"split": "test", "id": 8, "file_path": "e.jpg", "captions": []},  # a distractor: no query
        {"split": "test", "id": 7, "file_path": "f.jpg", "captions": []},
        {"split": "val", "id": 9, "file_path": "g.jpg", "captions": []},
    ]
    _write_dataset(tmp_path, "reid_raw.json", records)
    ds = parse_dataset("CUHK-PEDES", tmp_path)
    assert ds.num_skipped == 0
    # Train: pids {0, 1} (len(train_id_container) = 2), 3 images, 3 captions, samples only from pid 0.
    assert ds.num_train_ids == 2 and ds.counts("train") == (2, 3, 3)
    assert [(pid, image_id, caption) for pid, image_id, _, caption in ds.train_samples()] == [
        (0, 0, "c1"), (0, 0, "c2"), (0, 2, "c3")]
    # Test: every image in the gallery, only the captioned one gives a query.
    assert ds.gallery("test")[0] == [7, 8, 7] and ds.queries("test") == ([7], ["t1"])
    assert ds.counts("test") == (2, 3, 1)
    assert ds.gallery("val")[0] == [9] and ds.queries("val") == ([], []) and ds.counts("val") == (1, 1, 0)


def test_train_pid_without_captions_still_fills_the_pid_range(tmp_path: Path) -> None:
    # Without pid 1 (whose only image has no captions) the pids {0, 2} would fail the contiguity check.
    records = [{"split": "train", "id": 1, "file_path": "a.png", "captions": ["x"]},
               {"split": "train", "id": 2, "file_path": "b.png", "captions": []},
               {"split": "train", "id": 3, "file_path": "c.png", "captions": ["y"]}]
    _write_dataset(tmp_path, "reid_raw.json", records)
    ds = parse_dataset("CUHK-PEDES", tmp_path)
    assert ds.num_train_ids == 3 and [pid for pid, *_ in ds.train_samples()] == [0, 2]


@pytest.mark.parametrize("missing_id", [2, 3])  # a middle pid, and the highest one
def test_train_image_skipped_for_a_missing_file_keeps_its_pid(tmp_path: Path, missing_id: int) -> None:
    records = [{"split": "train", "id": i, "file_path": f"{i}.png", "captions": [f"c{i}"]} for i in (1, 2, 3)]
    records.append({"split": "test", "id": 9, "file_path": "t.png", "captions": ["q"]})
    _write_dataset(tmp_path, "reid_raw.json", records)
    (tmp_path / "imgs" / f"{missing_id}.png").unlink()
    with pytest.raises(DatasetError, match="does not exist"):
        parse_dataset("CUHK-PEDES", tmp_path)
    ds = parse_dataset("CUHK-PEDES", tmp_path, skip_bad=True)
    # Three train ids in the file -> three classes, although one image is gone (pid = id - 1 on CUHK).
    assert ds.num_skipped == 1 and ds.num_train_ids == 3
    assert sorted(pid for pid, *_ in ds.train_samples()) == sorted({0, 1, 2} - {missing_id - 1})


def test_missing_annotation_lists_paths_tried(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        parse_dataset("ICFG-PEDES", tmp_path)
    message = str(err.value)
    for tried in (tmp_path / "ICFG-PEDES.json", tmp_path / "ICFG_PEDES.json",
                  tmp_path / "ICFG-PEDES" / "ICFG-PEDES.json", tmp_path / "ICFG-PEDES" / "ICFG_PEDES.json"):
        assert str(tried) in message


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="is not a folder"):
        parse_dataset("RSTPReid", tmp_path / "nowhere")


def test_missing_image_folder(tmp_path: Path) -> None:
    (tmp_path / "reid_raw.json").write_text(json.dumps([_GOOD]))
    with pytest.raises(DatasetNotFoundError, match="image folder .*imgs not found"):
        parse_dataset("CUHK-PEDES", tmp_path)
    assert parse_dataset("CUHK-PEDES", tmp_path, check_images=False).counts("train") == (1, 1, 1)


@pytest.mark.parametrize("content, expected", [
    ("{not json", "is not valid JSON"),
    ('{"split": "train"}', "must hold a JSON list of records, got dict"),
])
def test_unreadable_annotation(tmp_path: Path, content: str, expected: str) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "reid_raw.json").write_text(content)
    with pytest.raises(DatasetError, match=expected):
        parse_dataset("CUHK-PEDES", tmp_path)
