"""Shard builder and manifest: counts, contents, determinism, interrupted builds, refusals, verification."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from irra_dist.data import shards
from irra_dist.data.parsers import parse_dataset
from irra_dist.data.shards import DEFAULT_SHARD_SIZE, MANIFEST_NAME, ShardError, build_shards, load_manifest
from irra_dist.engine import build_shards_cli
from irra_dist.synthetic.dataset import generate_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate_synthetic_dataset(root / "CUHK-PEDES", num_train_ids=6, num_val_ids=2, num_test_ids=3,
                               images_per_id=(1, 3), captions_per_image=2, seed=3)
    return root


@pytest.fixture(scope="module")
def parsed(dataset_root: Path):
    return parse_dataset("CUHK-PEDES", dataset_root)


def _load_launcher():
    path = REPO / "launch" / "build_shards.py"
    spec = importlib.util.spec_from_file_location("build_shards_launcher", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _build(parsed, out: Path, **kwargs) -> dict:
    kwargs.setdefault("shard_size", 4)
    kwargs.setdefault("workers", 2)
    return build_shards(parsed, None, out, **kwargs)


def test_manifest_counts_and_tar_contents_match_the_parser(parsed, tmp_path: Path) -> None:
    manifest = _build(parsed, tmp_path)
    assert manifest == json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["dataset"] == "CUHK-PEDES"
    assert manifest["num_train_ids"] == parsed.num_train_ids == 6
    annotation = Path(parsed.annotation_path).read_bytes()
    assert manifest["annotation_sha256"] == hashlib.sha256(annotation).hexdigest()
    assert manifest["image_format"] == "original" and manifest["num_skipped"] == 0
    for split, records in parsed.splits.items():
        entry = manifest["splits"][split]
        ids, images, captions = parsed.counts(split)
        assert (entry["num_ids"], entry["num_images"], entry["num_captions"]) == (ids, images, captions)
        assert entry["num_samples"] == captions
        assert len(entry["shards"]) == math.ceil(images / 4)
        assert sum(s["num_records"] for s in entry["shards"]) == images
        members = []
        for shard in entry["shards"]:
            path = tmp_path / shard["file"]
            data = path.read_bytes()
            assert shard["bytes"] == len(data)
            assert shard["sha256"] == hashlib.sha256(data).hexdigest()
            with tarfile.open(path) as tar:
                infos = tar.getmembers()
                assert all(i.mtime == 0 and i.uid == 0 and i.gid == 0 and i.uname == "" for i in infos)
                assert len(infos) == 2 * shard["num_records"]
                members += [(i.name, tar.extractfile(i).read()) for i in infos]
        # One member group per image, in annotation order: the original bytes plus the json.
        for position, record in enumerate(records):
            (img_name, img_bytes), (json_name, json_bytes) = members[2 * position:2 * position + 2]
            assert img_name == f"{position:08d}.jpg" and json_name == f"{position:08d}.json"
            assert img_bytes == Path(record.path).read_bytes()
            assert json.loads(json_bytes) == {"pid": record.pid, "image_id": record.image_id,
                                              "rel_path": record.rel_path, "captions": list(record.captions)}


def test_default_shard_size_splits_cuhk_train_into_at_least_64_shards() -> None:
    assert math.ceil(34054 / DEFAULT_SHARD_SIZE) >= 64


def test_rebuild_is_byte_identical_for_any_worker_count(parsed, tmp_path: Path) -> None:
    _build(parsed, tmp_path / "a", workers=1)
    _build(parsed, tmp_path / "b", workers=3)
    first = _files(tmp_path / "a")
    assert first == _files(tmp_path / "b")
    _build(parsed, tmp_path / "a", workers=2)  # rerun over the same folder
    assert _files(tmp_path / "a") == first


def test_progress_callback_counts_every_image(parsed, tmp_path: Path) -> None:
    done: list[int] = []
    _build(parsed, tmp_path / "out", progress=done.append)
    assert sum(done) == sum(len(records) for records in parsed.splits.values())


@pytest.mark.parametrize("fmt", ["png", "ppm"])
def test_pre_resize_stores_lossless_images_of_the_training_size(parsed, tmp_path: Path, fmt: str) -> None:
    manifest = _build(parsed, tmp_path, pre_resize="64x32", pre_resize_format=fmt)
    assert manifest["image_format"] == fmt and manifest["image_size"] == [64, 32]
    records = parsed.splits["train"]
    with tarfile.open(tmp_path / manifest["splits"]["train"]["shards"][1]["file"]) as tar:
        # webdataset's TarWriter writes a sample's members in extension order: json before png/ppm.
        assert tar.getnames()[:2] == [f"{4:08d}.json", f"{4:08d}.{fmt}"]
        stored = Image.open(io.BytesIO(tar.extractfile(f"{4:08d}.{fmt}").read()))
        stored.load()
    expected = Image.open(records[4].path).convert("RGB").resize((32, 64), Image.BILINEAR)
    assert stored.format == fmt.upper() and stored.size == (32, 64)
    assert stored.tobytes() == expected.tobytes()
    with pytest.raises(ShardError, match="pre_resize_format"):
        _build(parsed, tmp_path / "x", pre_resize="64x32", pre_resize_format="jpg")


def test_interrupted_build_never_looks_complete_and_rerun_completes(parsed, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    reference = tmp_path / "reference"
    _build(parsed, reference)
    out = tmp_path / "out"
    _build(parsed, out)  # a complete set that the interrupted rebuild starts from
    real_commit = shards._HashingWriter.commit
    calls = []

    def failing_commit(self):
        calls.append(self.path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted")
        return real_commit(self)

    monkeypatch.setattr(shards._HashingWriter, "commit", failing_commit)
    with pytest.raises(KeyboardInterrupt):
        _build(parsed, out)
    monkeypatch.undo()
    assert not (out / MANIFEST_NAME).exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ShardError, match="no manifest.json"):
        load_manifest(out)
    _build(parsed, out)
    assert _files(out) == _files(reference)


def test_sigkilled_build_leaves_no_manifest_and_rerun_completes(parsed, dataset_root: Path,
                                                               tmp_path: Path) -> None:
    reference, out = tmp_path / "reference", tmp_path / "out"
    _build(parsed, reference)
    # The child kills itself with SIGKILL while the third shard is being written: no cleanup runs.
    script = f"""
import os, signal
from irra_dist.data import shards
real = shards._HashingWriter.write
def write(self, data):
    if self.path.name == "train-000002.tar":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, data)
shards._HashingWriter.write = write
shards.build_shards("CUHK-PEDES", {str(dataset_root)!r}, {str(out)!r}, shard_size=4, workers=2)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert not (out / MANIFEST_NAME).exists()
    assert len(list(out.glob(".train-000002.tar.*.tmp"))) == 1  # the shard being written
    _build(parsed, out)
    assert _files(out) == _files(reference)


def test_different_dataset_is_refused_without_overwrite(parsed, dataset_root: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    main = _load_launcher().main
    out = tmp_path / "out"
    _build(parsed, out)
    other = tmp_path / "other" / "CUHK-PEDES"
    generate_synthetic_dataset(other, num_train_ids=3, num_val_ids=1, num_test_ids=1, images_per_id=1,
                               seed=9)
    other_parsed = parse_dataset("CUHK-PEDES", other)
    before = _files(out)
    with pytest.raises(ShardError, match="--overwrite"):
        _build(other_parsed, out)
    assert _files(out) == before
    argv = ["--dataset", "cuhk", "--root", str(other), "--out", str(out), "--shard-size", "4",
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--overwrite" in err[0]
    assert _files(out) == before
    assert main([*argv, "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "subset" in printed and "captions" in printed
    manifest = load_manifest(out, verify="full")
    assert manifest["annotation_sha256"] == other_parsed.annotation_sha256
    assert manifest["num_train_ids"] == 3
    # The old set's extra shards are gone; only the new set's files remain.
    listed = {MANIFEST_NAME, ".verified.json"} | {e["index"]["file"] for e in manifest["splits"].values()} | {
        e["shardlist"]["file"] for e in manifest["splits"].values()} | {
        s["file"] for e in manifest["splits"].values() for s in e["shards"]}
    assert {p.name for p in out.iterdir()} == listed


def test_foreign_files_are_refused_without_overwrite(parsed, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ShardError, match="not empty"):
        _build(parsed, tmp_path)
    _build(parsed, tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_missing_shard_and_manifest_mismatches_are_refused(parsed, tmp_path: Path) -> None:
    manifest = _build(parsed, tmp_path)
    load_manifest(tmp_path, verify="full")
    shard = tmp_path / manifest["splits"]["train"]["shards"][1]["file"]

    # Same size, different bytes: the size check passes, the SHA-256 check fails (the cache is invalidated).
    original = shard.read_bytes()
    shard.write_bytes(original[:600] + bytes(255 - b for b in original[600:700]) + original[700:])
    load_manifest(tmp_path)
    with pytest.raises(ShardError, match=f"{shard.name} does not match the SHA-256.*irra-build-shards"):
        load_manifest(tmp_path, verify="full")
    shard.write_bytes(original)
    load_manifest(tmp_path, verify="full")

    shard.write_bytes(original[:-1000])  # truncated
    with pytest.raises(ShardError, match=f"{shard.name} has {len(original) - 1000} bytes"):
        load_manifest(tmp_path)
    load_manifest(tmp_path, verify=False)
    shard.unlink()
    with pytest.raises(ShardError, match=f"{shard.name} is missing.*irra-build-shards"):
        load_manifest(tmp_path, verify=False)
    shard.write_bytes(original)

    edited = json.loads((tmp_path / MANIFEST_NAME).read_text())
    edited["splits"]["train"]["shards"][0]["bytes"] += 512
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(edited))
    with pytest.raises(ShardError, match="train-000000.tar has"):
        load_manifest(tmp_path)
    with pytest.raises(ValueError, match="verify must be"):
        load_manifest(tmp_path, verify="sha")


def test_unreadable_image_stops_the_build_unless_skip_bad(parsed, dataset_root: Path, tmp_path: Path) -> None:
    import copy

    broken = copy.deepcopy(parsed)
    victim = broken.splits["test"][1]
    bad_file = tmp_path / "broken.jpg"
    bad_file.write_bytes(b"\xff\xd8 not really a jpeg")
    broken.splits["test"][1] = type(victim)(victim.image_id, victim.pid, victim.rel_path, str(bad_file),
                                            victim.captions)
    with pytest.raises(ShardError, match="broken.jpg.*--skip-bad"):
        _build(broken, tmp_path / "a", pre_resize=(64, 32))
    assert not (tmp_path / "a" / MANIFEST_NAME).exists()
    manifest = _build(broken, tmp_path / "b", pre_resize=(64, 32), skip_bad=True)
    assert manifest["num_skipped"] == 1
    assert manifest["splits"]["test"]["num_images"] == len(parsed.splits["test"]) - 1
    with pytest.raises(ShardError, match="HxW"):
        _build(parsed, tmp_path / "c", pre_resize="64-32")


def test_skipped_image_of_the_last_train_pid_keeps_num_train_ids(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    folder = generate_synthetic_dataset(tmp_path / "CUHK-PEDES", num_train_ids=4, num_val_ids=0,
                                        num_test_ids=1, images_per_id=1, captions_per_image=1, seed=4)
    annos = json.loads((folder / "reid_raw.json").read_text())
    train = [a for a in annos if a["split"] == "train"]
    expected_ids = len({a["id"] for a in train})  # the official len(train_id_container)
    last = max(train, key=lambda a: a["id"])
    assert sum(a["id"] == last["id"] for a in train) == 1  # the only image of the highest pid
    (folder / "imgs" / last["file_path"]).write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"
    argv = ["--dataset", "cuhk", "--root", str(folder), "--out", str(out), "--pre-resize", "64x32",
            "--workers", "1", "--skip-bad", "--no-progress"]
    assert build_shards_cli.main(argv) == 0
    assert f"({expected_ids} train ids, 1 skipped)" in capsys.readouterr().out
    manifest = load_manifest(out)
    # The classifier keeps the parsed size although the highest pid has no sample left.
    assert manifest["num_train_ids"] == expected_ids == 4
    assert manifest["num_skipped"] == 1 and manifest["splits"]["train"]["num_ids"] == expected_ids - 1
    index = shards.SplitIndex.load(out, manifest, "train")
    assert index.pid.tolist() == list(range(expected_ids - 1))


def test_images_without_captions_stay_in_the_gallery_and_their_train_pid_counts(tmp_path: Path) -> None:
    from irra_dist.data.pipeline import TrainLoader, build_eval_loaders

    folder = generate_synthetic_dataset(tmp_path / "CUHK-PEDES", num_train_ids=3, num_val_ids=0,
                                        num_test_ids=2, images_per_id=2, captions_per_image=2, seed=6)
    annotation = folder / "reid_raw.json"
    annos = json.loads(annotation.read_text())
    # Ids 1-3 train (pids 0-2), ids 4-5 test, two images each: empty the captions of train id 2 (pid 1, a
    # middle pid) and of test id 5 (two distractors).
    for anno in annos:
        if anno["id"] in (2, 5):
            anno["captions"] = []
    annotation.write_text(json.dumps(annos))
    out = tmp_path / "out"
    manifest = build_shards("CUHK-PEDES", tmp_path, out, shard_size=4, workers=1)
    assert manifest["num_train_ids"] == 3
    train, test = manifest["splits"]["train"], manifest["splits"]["test"]
    assert (train["num_ids"], train["num_images"], train["num_captions"]) == (3, 6, 8)
    assert (test["num_ids"], test["num_images"], test["num_captions"]) == (2, 4, 4)

    size = (64, 32)
    loader = TrainLoader(out, global_batch_size=4, image_size=size, image_aug=False, mlm=False)
    assert loader.num_train_ids == 3 and loader.num_samples == 8
    pids = sorted(p for batch in loader for p in batch["pids"].tolist())
    assert pids == [0] * 4 + [2] * 4
    gallery, queries = build_eval_loaders(out, "test", image_size=size, batch_size=8)
    assert [p for b in gallery for p in b["pids"].tolist()] == [4, 4, 5, 5]
    assert [p for b in queries for p in b["pids"].tolist()] == [4, 4, 4, 4]

    # A train split whose images all lack captions has nothing to train on.
    for anno in annos:
        if anno["split"] == "train":
            anno["captions"] = []
    annotation.write_text(json.dumps(annos))
    build_shards("CUHK-PEDES", tmp_path, out, shard_size=4, workers=1, overwrite=True)
    with pytest.raises(ShardError, match="no training captions"):
        TrainLoader(out, global_batch_size=4, image_size=size)


def test_torch_free_record_read_equals_the_wids_reader(tiny_shards: Path) -> None:
    """read_record_members (tarfile, for the ONNX serving path) returns what wids returns, every record."""
    from irra_dist.data.shards import RecordReader, SplitIndex, load_manifest, read_record_members

    manifest = load_manifest(tiny_shards)
    for split in ("train", "test"):
        index = SplitIndex.load(tiny_shards, manifest, split)
        reader = RecordReader(index)
        assert len(set(index.shard.tolist())) > 1  # records spread over several shards
        for record in range(len(index)):
            assert read_record_members(index, record) == reader.sample(record), (split, record)
