"""The WebDataset ecosystem: sets readable by plain webdataset and wids, sets written by other tools, remote
sets over HTTP and pipe: (verified cache, size cap, bad input), and streaming mode."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import webdataset as wds
import wids
from conftest import reset_accelerate
from PIL import Image

from irra_dist.config import ConfigError, load_config
from irra_dist.data.parsers import parse_dataset
from irra_dist.data.pipeline import TrainLoader, build_eval_loaders
from irra_dist.data.shards import MANIFEST_NAME, ShardError, build_shards, load_manifest
from irra_dist.data.streaming import StreamTrainLoader
from irra_dist.engine.build_shards_cli import main
from irra_dist.engine.runlog import read_metrics
from irra_dist.synthetic.dataset import generate_synthetic_dataset
from irra_dist.tokenizer import tokenize

SIZE = (64, 32)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def parsed(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("wds_data")
    generate_synthetic_dataset(root / "CUHK-PEDES", num_train_ids=6, num_val_ids=0, num_test_ids=2,
                               images_per_id=(1, 3), captions_per_image=2, seed=11)
    return parse_dataset("CUHK-PEDES", root)


@pytest.fixture(scope="module")
def shard_dir(parsed, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wds_shards")
    build_shards(parsed, None, out, shard_size=4, workers=1)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def http_server(folder: Path, log: Path | None = None) -> Iterator[str]:
    """``python -m http.server`` on 127.0.0.1 serving `folder`, requests logged to `log`; yields its URL."""
    port = _free_port()
    with open(log or os.devnull, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                 "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                assert proc.poll() is None and time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.05)
            yield f"http://127.0.0.1:{port}/"
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)


def _epoch(loader) -> dict[str, torch.Tensor]:
    batches = list(loader)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# Interoperability


def test_plain_webdataset_and_wids_read_a_built_set(parsed, shard_dir: Path, tmp_path: Path) -> None:
    manifest = load_manifest(shard_dir)
    for split in ("train", "test"):
        records = parsed.splits[split]
        entry = manifest["splits"][split]
        urls = [str(shard_dir / s["file"]) for s in entry["shards"]]
        samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
        assert len(samples) == entry["num_images"] == len(records)
        assert sum(len(s["json"]["captions"]) for s in samples) == entry["num_captions"]
        for sample, record in zip(samples, records):
            assert sample["json"]["captions"] == list(record.captions) and sample["json"]["pid"] == record.pid
            assert sample["jpg"].tobytes() == Image.open(record.path).convert("RGB").tobytes()
        # wids reads the split's shard list beside the manifest (it copies local shards into its cache).
        dataset = wids.ShardListDataset(str(shard_dir / f"{split}-shards.json"),
                                        cache_dir=str(tmp_path / split))
        assert len(dataset) == len(records)
        for i, record in enumerate(records):
            sample = dataset[i]  # wids' default decoding: json -> dict, jpg -> PIL image
            assert sample[".json"]["captions"] == list(record.captions)
            assert sample[".jpg"].tobytes() == Image.open(record.path).convert("RGB").tobytes()


def test_set_written_by_plain_shardwriter_trains_after_index_only(parsed, tmp_path: Path,
                                                                  fresh_accelerate, make_tiny_recipe,
                                                                  capsys: pytest.CaptureFixture) -> None:
    from irra_dist.engine.trainer import train

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for split in ("train", "test"):
        # Another tool's conventions: webdataset's own encoders (PIL image -> .png), keys not positions.
        with wds.ShardWriter(str(foreign / f"{split}-%06d.tar"), maxcount=5, verbose=0) as sink:
            for record in parsed.splits[split]:
                image = Image.open(record.path).convert("RGB")
                sink.write({"__key__": f"img_{record.image_id}", "png": image,
                            "json": {"pid": record.pid, "captions": list(record.captions)}})
    assert main(["--index-only", "--out", str(foreign)]) == 0
    capsys.readouterr()
    manifest = load_manifest(foreign, verify="full")
    assert manifest["num_train_ids"] == parsed.num_train_ids
    train_samples = parsed.train_samples()
    loader = TrainLoader(foreign, global_batch_size=7, image_size=SIZE, image_aug=False)
    got = _epoch(loader)
    assert sorted(got["pids"].tolist()) == sorted(s[0] for s in train_samples)
    gallery, queries = build_eval_loaders(foreign, "test", image_size=SIZE, batch_size=4)
    assert [p for b in gallery for p in b["pids"].tolist()] == parsed.gallery("test")[0]
    assert [p for b in queries for p in b["pids"].tolist()] == parsed.queries("test")[0]

    recipe = make_tiny_recipe(tmp_path)
    run = train(load_config(recipe, [f"data.shards={foreign}", "train.batch_size=8",
                                     "train.run_name=foreign"]))
    losses = [row["loss"] for row in read_metrics(run / "metrics.jsonl") if row["kind"] == "train"]
    assert len(losses) == -(-len(train_samples) // 8) and all(math.isfinite(v) for v in losses)

    # A sample without its json is named, with the fix.
    with wds.TarWriter(str(foreign / "train-000009.tar")) as sink:
        sink.write({"__key__": "lonely", "png": Image.new("RGB", (8, 16))})
    assert main(["--index-only", "--out", str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train-000009.tar" in err[0] and "'lonely'" in err[0] and "pid" in err[0]
    assert not (foreign / MANIFEST_NAME).exists()


# --------------------------------------------------------------------------------------------------
# Remote sets


def test_http_training_equals_local_training_step_by_step(tiny_shards: Path, tmp_path: Path, fresh_accelerate,
                                                          make_tiny_recipe) -> None:
    from irra_dist.engine.trainer import train

    recipe = make_tiny_recipe(tmp_path)
    common = ["eval.eval_period=1", "train.num_epochs=1"]
    local = train(load_config(recipe, [*common, "train.run_name=local"]))
    reset_accelerate()
    cache = tmp_path / "cache"
    with http_server(tiny_shards) as url:
        remote = train(load_config(recipe, [*common, "train.run_name=http", f"data.shards={url}",
                                            f"data.cache_dir={cache}"]))
    rows = {name: [r for r in read_metrics(run / "metrics.jsonl")] for name, run in
            (("local", local), ("http", remote))}
    train_losses = {name: [(r["step"], r["loss"]) for r in v if r["kind"] == "train"]
                    for name, v in rows.items()}
    assert len(train_losses["local"]) >= 3 and train_losses["http"] == train_losses["local"]
    evals = {name: [r for r in v if r["kind"] == "eval"] for name, v in rows.items()}
    assert evals["http"] and [r["metrics"] for r in evals["http"]] == [r["metrics"] for r in evals["local"]]
    # The cache holds verified copies of every train and test shard, nothing half-written.
    manifest = load_manifest(tiny_shards)
    cached = {p.name.split("-", 1)[1]: p.read_bytes() for p in cache.rglob("*.tar")}
    wanted = {s["file"] for split in ("train", "test") for s in manifest["splits"][split]["shards"]}
    assert set(cached) == wanted and not list(cache.rglob("*.tmp"))
    assert all(cached[name] == (tiny_shards / name).read_bytes() for name in wanted)


def test_pipe_source_and_a_capped_cache_give_the_local_batches(shard_dir: Path, tmp_path: Path) -> None:
    reference = _epoch(TrainLoader(shard_dir, global_batch_size=6, image_size=SIZE))
    shard_sizes = sorted(s["bytes"] for s in load_manifest(shard_dir)["splits"]["train"]["shards"])
    cap = shard_sizes[-1] + shard_sizes[-2]  # two shards at most: the loader fetches as it reads
    cache = tmp_path / "cache"
    loader = TrainLoader(f"pipe:cat {shard_dir}/{{name}}", global_batch_size=6, image_size=SIZE,
                         cache_dir=cache, cache_max_gb=cap / 2**30)
    got = _epoch(loader)
    for key in reference:
        assert torch.equal(got[key], reference[key]), key
    assert sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) <= cap
    assert len(list(cache.rglob("*.tar"))) <= 2


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_remote_bad_input_is_one_line_naming_the_shard_and_nothing_half_written(shard_dir: Path,
                                                                                tmp_path: Path) -> None:
    served = tmp_path / "served"
    shutil.copytree(shard_dir, served)
    cache = tmp_path / "cache"
    manifest = load_manifest(shard_dir)
    victim = manifest["splits"]["train"]["shards"][1]["file"]
    original = (shard_dir / victim).read_bytes()
    log = tmp_path / "requests.log"

    # Nothing listens on this port: an unreachable host.
    with pytest.raises(ShardError) as err:
        TrainLoader(f"http://127.0.0.1:{_free_port()}/set", global_batch_size=4, image_size=SIZE,
                    cache_dir=cache)
    assert "manifest.json" in _one_line(err) and "cannot reach" in str(err.value)

    with http_server(served, log) as url:
        def load():
            return TrainLoader(url, global_batch_size=4, image_size=SIZE, cache_dir=cache)

        (served / victim).unlink()  # 404
        with pytest.raises(ShardError) as err:
            load()
        assert f"shard {victim}" in _one_line(err) and "HTTP 404" in str(err.value)

        (served / victim).write_bytes(original[:-700])  # truncated
        with pytest.raises(ShardError) as err:
            load()
        assert f"shard {victim}" in _one_line(err) and "truncated" in str(err.value)

        flipped = original[:600] + bytes(255 - b for b in original[600:700]) + original[700:]
        (served / victim).write_bytes(flipped)  # same size, other bytes
        with pytest.raises(ShardError) as err:
            load()
        assert f"shard {victim}" in _one_line(err) and "SHA-256" in str(err.value)

        (served / victim).write_bytes(original)
        edited = json.loads((served / MANIFEST_NAME).read_text())
        edited["splits"]["train"]["shards"][0]["num_records"] -= 1  # the shard list disagrees
        (served / MANIFEST_NAME).write_text(json.dumps(edited))
        with pytest.raises(ShardError) as err:
            load()
        assert "train-index.json does not match the record counts" in _one_line(err)
    requests = [line for line in log.read_text().splitlines() if f"GET /{victim} " in line]
    # 404: asked once; truncated and mismatching: fetched again once each.
    assert len(requests) == 1 + 2 + 2
    assert not list(cache.rglob("*.tmp")) and not list(cache.rglob(f"*{victim}"))


# --------------------------------------------------------------------------------------------------
# Streaming


def test_streaming_epoch_is_fixed_reads_every_source_alike_and_resumes(parsed, shard_dir: Path,
                                                                       tmp_path: Path) -> None:
    num_captions = sum(len(r.captions) for r in parsed.splits["train"])
    captions = {(r.pid, c) for r in parsed.splits["train"] for c in r.captions}

    def stream(source, **kwargs) -> StreamTrainLoader:
        return StreamTrainLoader(source, global_batch_size=6, image_size=SIZE, shuffle_buffer=8, **kwargs)

    local = stream(shard_dir, num_workers=2)
    batches = list(local)
    sizes = [len(b["pids"]) for b in batches]
    assert len(batches) == len(local) == -(-num_captions // 6)
    assert sizes == [min(6, num_captions - 6 * k) for k in range(len(sizes))] and local.skipped == 0
    with http_server(shard_dir) as url:
        over_http = list(stream(url, num_workers=2))
    over_pipe = list(stream(f"pipe:cat {shard_dir}/{{name}}", num_workers=2))
    for other in (over_http, over_pipe):
        for a, b in zip(batches, other, strict=True):  # caption_ids: the masked captions, masks included
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["caption_ids"], b["caption_ids"])
    # Every sample is a real caption of its pid (the masks hide some tokens, so compare the clean text).
    clean = stream(shard_dir, mlm=False)
    by_ids = {tuple(tokenize(c).tolist()): (p, c) for p, c in captions}
    for batch in clean:
        for ids, pid in zip(batch["caption_ids"].tolist(), batch["pids"].tolist()):
            assert by_ids[tuple(ids)][0] == pid
    # Resume at step 3 of epoch 2 continues the same streams; another epoch reads other samples.
    local.set_epoch(2)
    second = list(local)
    assert not torch.equal(second[0]["images"], batches[0]["images"])
    local.set_epoch(2)
    local.start_batch = 3
    resumed = list(local)
    assert len(resumed) == len(second) - 3
    for a, b in zip(second[3:], resumed, strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["mlm_labels"], b["mlm_labels"])
    # Two ranks: each takes its share of every global batch from its own streams.
    ranks = [list(stream(shard_dir, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(b["pids"]) for b in ranks[0]] == [-(-s // 2) for s in sizes]
    assert [len(b["pids"]) for b in ranks[1]] == [s // 2 for s in sizes]
    assert not torch.equal(ranks[0][0]["images"][:1], ranks[1][0]["images"][:1])


def test_stream_mixture_with_a_source_over_http_reads_like_both_local(shard_dir: Path,
                                                                     tiny_shards: Path) -> None:
    """A streamed corpus on a server mixed with a local labelled set: the batches of the all-local mixture."""
    from irra_dist.data.mixture import TrainSource

    def mixture(second: str) -> dict[str, torch.Tensor]:
        sources = [TrainSource(tiny_shards, 1.0, "local"), TrainSource(second, 2.0, "corpus")]
        loader = StreamTrainLoader(sources, global_batch_size=6, image_size=SIZE, shuffle_buffer=8,
                                   num_workers=2)
        loader.set_epoch(2)
        return _epoch(loader)

    local = mixture(str(shard_dir))
    with http_server(shard_dir) as url:
        remote = mixture(url)
    for key in ("images", "caption_ids", "pids", "mlm_labels"):
        assert torch.equal(local[key], remote[key]), key


def test_streaming_mode_trains_an_epoch(tiny_recipe: Path, fresh_accelerate) -> None:
    from irra_dist.engine.trainer import train

    run = train(load_config(tiny_recipe, ["data.mode=stream", "data.shuffle_buffer=16",
                                          "eval.eval_period=1"]))
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"][-1] >= 3
    assert [r for r in rows if r["kind"] == "eval"]
    with pytest.raises(ConfigError, match="data.mode=indexed"):
        load_config(tiny_recipe, ["data.mode=stream", "data.sampler=identity"])


def test_stream_failure_is_one_line(shard_dir: Path, tmp_path: Path) -> None:
    served = tmp_path / "served"
    shutil.copytree(shard_dir, served)
    victim = sorted(served.glob("train-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:-2000])
    with http_server(served) as url:
        loader = StreamTrainLoader(url, global_batch_size=6, image_size=SIZE, num_workers=1)
        with pytest.raises(ShardError) as err:
            list(loader)
    assert victim.name in _one_line(err)
