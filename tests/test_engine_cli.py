"""The command lines: bad input gives one ``error:`` line and exit status 2; W&B runs offline without a key;
``irra-eval`` evaluates a run folder and writes JSON."""

from __future__ import annotations

import glob
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, direct_metrics, small_irra, subprocess_env
from PIL import Image

from irra_dist.engine.cli import evaluate_main, train_main

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(("override", "fragment"), [
    ("train.bogus=1", "unknown config key 'train.bogus'"),
    ("train.batch_size=many", "wrong type for 'train.batch_size'"),
    ("train.batch_size=0", "train.batch_size"),
    ("optim.step_per=hour", "optim.step_per"),
    ("trainbatch", "cannot read override"),
])
def test_bad_config_is_one_line_and_exit_2(tiny_recipe: Path, capsys, override: str, fragment: str) -> None:
    assert train_main(["--config", str(tiny_recipe), override]) == 2
    captured = capsys.readouterr()
    assert fragment in _one_error_line(captured.err)
    assert not (tiny_recipe.parent / "runs").exists()


def test_missing_recipe_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    assert train_main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in _one_error_line(capsys.readouterr().err)


def test_missing_shards_is_one_line_and_exit_2(tiny_recipe: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no_such_shards"
    assert train_main(["--config", str(tiny_recipe), f"data.shards={missing}"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "manifest.json" in line and str(missing) in line
    assert not (tiny_recipe.parent / "runs").exists()  # no empty run folder left behind


def test_resume_without_any_run_is_one_line_and_exit_2(tiny_recipe: Path, capsys) -> None:
    assert train_main(["--config", str(tiny_recipe), "--resume"]) == 2
    assert "found no run" in _one_error_line(capsys.readouterr().err)


def test_bad_input_in_a_child_process_prints_no_traceback(tiny_recipe: Path) -> None:
    done = subprocess.run([sys.executable, "launch/train.py", "--config", str(tiny_recipe), "model.depth=3"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown config key 'model.depth'" in _one_error_line(done.stderr)


def test_evaluate_bad_target_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    assert evaluate_main([str(tmp_path / "nothing_here")]) == 2
    assert "weights not found: nothing at" in _one_error_line(capsys.readouterr().err)


def test_evaluate_weights_file_needs_shards(tmp_path: Path, capsys) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not really")
    assert evaluate_main([str(weights)]) == 2
    assert "--shards" in _one_error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------------------------------
# W&B offline, and irra-eval on a finished run


def _wandb_history(run_file: Path) -> list[dict[str, str]]:
    """History rows of a .wandb file: a LevelDB-style log of protobuf records (32 KiB blocks, 7-byte record
    headers: crc32, length, type; FULL=1, FIRST=2, MIDDLE=3, LAST=4) after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    raw = run_file.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(data)
        elif kind == 2:
            pending = data
        elif kind == 3:
            pending += data
        elif kind == 4:
            records.append(pending + data)
    rows = []
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json
                         for item in record.history.item})
    return rows


@pytest.mark.slow
def test_offline_wandb_run_holds_the_logged_metrics_and_eval_cli_reads_the_run(tiny_recipe: Path,
                                                                                 monkeypatch, capsys) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tiny_recipe.parent / "no_netrc"))
    monkeypatch.delenv("WANDB_SILENT", raising=False)  # as a user has it
    import wandb

    from irra_dist.engine.trainer import Trainer

    wandb_running_at_summary = []
    summary = Trainer._log_summary
    monkeypatch.setattr(Trainer, "_log_summary",
                        lambda self: (wandb_running_at_summary.append(wandb.run is not None), summary(self)))
    assert train_main(["--config", str(tiny_recipe), "train.run_name=wb", "logging.wandb=true",
                       "logging.wandb_mode=auto", "eval.split=val"]) == 0
    run = tiny_recipe.parent / "runs" / "wb"
    # What the user read (issue 18): a config summary (the config is in config.yaml), no W&B history
    # panel, and the run's final table and folder as the last lines: W&B has closed before they print.
    console = "".join(capsys.readouterr())
    assert "full config: " in console and "vision_layers:" not in console
    assert "Run summary" not in console and "Run history" not in console
    assert wandb_running_at_summary == [False]
    assert "FutureWarning" not in console and "Setting accelerator to CPU" not in console
    files = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    history = _wandb_history(Path(files[0]))
    logged = {row["_step"]: row for row in history}
    metrics = [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    train_rows = [row for row in metrics if row["kind"] == "train"]
    assert len(train_rows) == 5
    for row in train_rows:
        assert float(logged[str(row["step"])]["train/loss"]) == pytest.approx(row["loss"])
        assert float(logged[str(row["step"])]["train/global_batch"]) == 16
        assert row["samples_per_s"] > 0 and row["lr"] == pytest.approx(1e-4)
    eval_row = [row for row in metrics if row["kind"] == "eval"][0]
    assert eval_row["split"] == "val" and eval_row["selects"]
    r1 = [float(row["val/t2i_R1"]) for row in history if "val/t2i_R1" in row]
    assert r1 == [pytest.approx(eval_row["metrics"]["t2i"]["R1"])]
    # test touched once, after training, on best (= last here: one epoch); logged under the selection rule
    finals = [row for row in metrics if row["kind"] == "final"]
    assert [(row["weights"], row["epoch"], row["split"]) for row in finals] == [("best", 1, "test"),
                                                                                ("last", 1, "test")]
    best_r1 = finals[0]["metrics"]["t2i"]["R1"]
    for rule in ("best_on_val", "last"):
        logged_r1 = [float(row[f"{rule}/test_t2i_R1"]) for row in history if f"{rule}/test_t2i_R1" in row]
        assert logged_r1 == [pytest.approx(best_r1)]
    assert not any("test/t2i_R1" in row for row in history)  # no per-epoch test metric exists
    tables = [row for row in history if row.get("results/test_t2i/_type") == '"table-file"']
    assert len(tables) == 1
    assert "W&B is offline" in (run / "train_log.txt").read_text()
    # the retrieval grid of the evaluation: a PNG in the run folder, logged to W&B as an image
    grid = run / "retrieval" / "epoch_001.png"
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.width > 0
    images = [row for row in history if row.get("val/retrieval_examples/_type") == '"image-file"']
    assert len(images) == 1 and images[0]["val/retrieval_examples/format"] == '"png"'
    assert len([row for row in history if row.get("test/retrieval_examples/_type") == '"image-file"']) == 1

    # irra-eval on the run folder: the table on stdout and the same numbers in --out.
    capsys.readouterr()
    out = tiny_recipe.parent / "eval.json"
    assert evaluate_main([str(run), "--out", str(out), "--num-workers", "0", "--i2t"]) == 0
    printed = capsys.readouterr().out
    assert "| t2i  |" in printed and "| i2t  |" in printed
    result = json.loads(out.read_text())
    assert result["target"].endswith("best.safetensors")
    assert result["split"] == "test"
    assert result["metrics"]["t2i"] == pytest.approx(finals[0]["metrics"]["t2i"], abs=1e-4)

    # --export-official: the best weights as an official best.pth ({"model": state_dict}, same tensors).
    import torch
    from safetensors.torch import load_file

    pth = tiny_recipe.parent / "best.pth"
    assert evaluate_main([str(run), "--export-official", str(pth)]) == 0
    exported = torch.load(pth, weights_only=True)["model"]
    stored = load_file(run / "best.safetensors")
    assert exported.keys() == stored.keys()
    assert all(torch.equal(exported[k], stored[k]) for k in stored)


def test_evaluate_official_best_pth_equals_scoring_the_model_directly(tiny_shards: Path, tmp_path: Path,
                                                                       capsys) -> None:
    import torch

    from irra_dist.model import export_official_checkpoint

    torch.manual_seed(0)
    # 64-wide attention heads, as in CLIP: an official file does not record the head count.
    model = small_irra(width=64, heads=1)
    pth = tmp_path / "best.pth"
    export_official_checkpoint(model, pth)
    expected = direct_metrics(model, tiny_shards)
    out = tmp_path / "metrics.json"
    args = [str(pth), "--shards", str(tiny_shards), "--image-size", "64x32", "--stride", "16",
            "--num-workers", "0", "--batch-size", "6", "--out", str(out)]
    assert evaluate_main(args) == 0
    assert "| t2i  |" in capsys.readouterr().out
    assert json.loads(out.read_text())["metrics"]["t2i"] == pytest.approx(expected, abs=1e-4)
