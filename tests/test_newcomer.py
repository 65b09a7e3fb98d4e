"""What a new user hit (issue 18): each test reproduces one reported failure through the command a user runs.

Wrong reloads of official exports, two trainings in one run folder, runs bound to the directory they were
started in, late failures that leave debris, manifests that disagree with their shards, demo data generated
at a typo, damaged checkpoints that resume, Ctrl-C tracebacks.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, direct_metrics, run_group, small_irra, subprocess_env

from irra_dist.engine.cli import evaluate_main, train_main

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


# --------------------------------------------------------------------------------------------------
# 1. An official-format export reloads as the same model


def test_official_export_reloads_with_its_head_counts_and_input_size(tiny_shards: Path, tmp_path: Path,
                                                                      capsys) -> None:
    from irra_dist.model import export_official_checkpoint, load_irra_weights

    torch.manual_seed(0)
    # 2 heads of width 16: the official width // 64 rule would rebuild 1 head, which loads without error.
    model = small_irra()
    pth = tmp_path / "best.pth"
    export_official_checkpoint(model, pth)
    saved = torch.load(pth, weights_only=True)
    assert set(saved["model"]) == set(model.state_dict())  # what the official test.py reads is unchanged

    reloaded = load_irra_weights(pth).eval()  # no size arguments: the file says what it is
    sizes = reloaded.base_model.sizes
    assert (sizes.vision_heads, sizes.text_heads) == (2, 2)
    assert tuple(reloaded.base_model.visual.image_size) == (64, 32)
    images, text = torch.rand(3, 3, 64, 32), torch.randint(1, 49000, (3, 77))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(images), model.encode_image(images))
        torch.testing.assert_close(reloaded.encode_text(text), model.encode_text(text))

    # irra-eval on the export gives the metrics of the model it was exported from.
    expected = direct_metrics(model, tiny_shards)
    out = tmp_path / "metrics.json"
    assert evaluate_main([str(pth), "--shards", str(tiny_shards), "--num-workers", "0", "--precision", "no",
                          "--out", str(out)]) == 0
    capsys.readouterr()
    assert json.loads(out.read_text())["metrics"]["t2i"] == pytest.approx(expected, abs=1e-4)


# --------------------------------------------------------------------------------------------------
# 2. One training per run folder


def test_second_training_on_a_busy_run_folder_is_refused_before_writing(tiny_recipe: Path, capsys) -> None:
    run = tiny_recipe.parent / "runs" / "shared"
    run.mkdir(parents=True)
    # The first training has claimed the folder and not written config.yaml yet (the old check's window).
    # Its lock is held here, on another open file: flock excludes it as it would another process.
    with open(run / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert train_main(["--config", str(tiny_recipe), "train.run_name=shared"]) == 2
    assert "is in use by another training" in _one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written into the other run's folder


def test_new_run_on_an_existing_run_folder_is_refused(tiny_recipe: Path, capsys) -> None:
    run = tiny_recipe.parent / "runs" / "done"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: earlier\n")
    assert train_main(["--config", str(tiny_recipe), "train.run_name=done"]) == 2
    assert "already exists: resume it with --resume" in _one_error_line(capsys.readouterr().err)
    assert (run / "config.yaml").read_text() == "name: earlier\n"


# --------------------------------------------------------------------------------------------------
# 3. A run folder works from any directory, and after the repository moved


def test_run_started_with_relative_paths_works_from_elsewhere_after_a_move(
        tiny_recipe: Path, tiny_shards: Path, monkeypatch, capsys) -> None:
    repo = tiny_recipe.parent / "repo"
    shutil.copytree(tiny_shards, repo / "shards")
    monkeypatch.chdir(repo)
    assert train_main(["--config", str(tiny_recipe), "data.shards=shards", "train.output_dir=runs",
                       "train.run_name=rel"]) == 0
    trained_r1 = [row for row in map(json.loads, (repo / "runs/rel/metrics.jsonl").read_text().splitlines())
                  if row["kind"] == "eval"][-1]["metrics"]["t2i"]["R1"]
    moved = tiny_recipe.parent / "moved"
    repo.rename(moved)
    monkeypatch.chdir("/")
    capsys.readouterr()

    out = tiny_recipe.parent / "eval.json"
    done = run_group([sys.executable, str(REPO / "launch/evaluate.py"), str(moved / "runs/rel"),
                      "--num-workers", "0", "--out", str(out)], cwd=Path("/"), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert Path(result["shards"]) == moved / "shards"
    assert result["metrics"]["t2i"]["R1"] == pytest.approx(trained_r1, abs=1e-4)

    from irra_dist.engine.cli import load_train_config
    from irra_dist.retrieval.model import load_search_model

    assert load_search_model(moved / "runs/rel").default_gallery == moved / "shards"
    cfg, checkpoint = load_train_config(None, [], str(moved / "runs/rel"))
    assert Path(cfg.data.shards) == moved / "shards" and checkpoint.parent.parent == moved / "runs/rel"


# --------------------------------------------------------------------------------------------------
# 4. Impossible settings fail before anything is created, with the setting to change


def test_warmup_not_shorter_than_training_is_one_line_before_any_folder(tiny_recipe: Path, capsys) -> None:
    assert train_main(["--config", str(tiny_recipe), "optim.warmup_epochs=1"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "optim.warmup_epochs=0" in line and "train.num_epochs" in line
    assert not (tiny_recipe.parent / "runs").exists()


def test_a_start_that_fails_after_claiming_its_folder_removes_it(tiny_recipe: Path, monkeypatch,
                                                                 capsys) -> None:
    from irra_dist.engine import trainer

    def fail(*args, **kwargs):
        raise trainer.ConfigError("refused by the test")

    monkeypatch.setattr(trainer, "save_config", fail)  # the first write into the claimed folder
    assert train_main(["--config", str(tiny_recipe), "train.run_name=failed"]) == 2
    assert "refused by the test" in _one_error_line(capsys.readouterr().err)
    assert list((tiny_recipe.parent / "runs").iterdir()) == []


@pytest.mark.dist
def test_bad_input_under_accelerate_launch_names_the_fix_in_the_launcher_summary(tiny_recipe: Path,
                                                                                  launch) -> None:
    done = launch("cpu_2proc.yaml", "train.py", ["--config", str(tiny_recipe), "optim.warmup_epochs=3"],
                  timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    ours = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "optim.warmup_epochs=0" in ours[0], output[-3000:]
    # torch elastic's failure table quotes the line instead of "To enable traceback see ..."
    assert "traceback : error: optim.warmup_epochs=3" in output, output[-3000:]
    assert "To enable traceback" not in output, output[-3000:]
    assert not (tiny_recipe.parent / "runs").exists()


# --------------------------------------------------------------------------------------------------
# 5. A manifest that disagrees with its shards is refused before training


def test_manifest_with_too_few_train_ids_is_refused_before_training(tiny_recipe: Path, tiny_shards: Path,
                                                                    capsys) -> None:
    shards = tiny_recipe.parent / "shards"
    shutil.copytree(tiny_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["num_train_ids"] = 5  # the tiny set has 13 train ids (pids 0..12)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert train_main(["--config", str(tiny_recipe), f"data.shards={shards}"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "num_train_ids=5" in line and "person id 12" in line
    assert not (tiny_recipe.parent / "runs").exists()


# --------------------------------------------------------------------------------------------------
# 6. Demo data is generated only at the demo's own location


def test_demo_recipe_with_a_mistyped_shards_folder_generates_nothing(tmp_path: Path, capsys) -> None:
    typo = tmp_path / "shards" / "demoo"
    assert train_main(["--config", "demo", f"data.shards={typo}", f"train.output_dir={tmp_path / 'runs'}",
                       "logging.wandb=false"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(typo) in line and "data.build_demo_if_missing=true" in line
    assert not typo.exists() and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------------
# 7. A damaged checkpoint of the right size is refused, naming the file


def test_checkpoint_with_flipped_bytes_inside_the_weights_is_refused(tmp_path: Path) -> None:
    from accelerate import Accelerator
    from torch import nn

    from irra_dist.engine.checkpointing import TrainerState, load_checkpoint, save_checkpoint
    from irra_dist.model import CheckpointError

    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    ckpt = save_checkpoint(accelerator, tmp_path, TrainerState(step=1))
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])  # still valid floats
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is damaged") as info:
        load_checkpoint(accelerator, ckpt)
    assert str(weights) in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# 9. Ctrl-C: a clean stop, the last checkpoint kept, the exact command that continues


def test_ctrl_c_stops_cleanly_and_prints_the_resume_command(tiny_recipe: Path) -> None:
    from irra_dist.engine.checkpointing import verify_checkpoint

    run = tiny_recipe.parent / "runs" / "stopped"
    args = [sys.executable, str(REPO / "launch/train.py"), "--config", str(tiny_recipe),
            # Epochs enough that the run cannot end by itself before the Ctrl-C, however loaded the machine.
            "train.run_name=stopped", "train.num_epochs=100000", "train.checkpoint_every_steps=1",
            "eval.eval_period=0"]
    # A terminal's foreground job takes Ctrl-C even when this test runs where SIGINT is ignored (a shell's
    # background job inherits SIG_IGN, and Python then installs no KeyboardInterrupt handler).
    proc = subprocess.Popen(args, cwd=tiny_recipe.parent, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 600
        while not (run / "checkpoints" / "last").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the foreground group
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, f"exit {proc.returncode}\nstderr: {err[-2000:]}\nstdout: {out[-2000:]}"
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    command = f"{sys.executable} {REPO / 'launch/train.py'} --resume {run}"
    assert f"continue with: {command}" in err
    verify_checkpoint((run / "checkpoints" / "last").resolve())  # the last checkpoint is complete
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["num_epochs"] == 100000  # --resume alone continues with the run's own settings


# --------------------------------------------------------------------------------------------------
# 12. CPU threads follow the cores actually available


def test_default_cpu_threads_follow_affinity_and_load(monkeypatch) -> None:
    from irra_dist.engine.accel import cpu_threads, free_cores

    # hand-computed: usable cores minus the rounded 1-minute load, at least 1
    assert free_cores(usable=2, load=1.1) == 1  # another job on one of two cores
    assert free_cores(usable=8, load=2.6) == 5
    assert free_cores(usable=4, load=9.0) == 1
    assert free_cores(usable=4, load=0.0) == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    original = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(original)})  # as `taskset -c 0` or a one-core cpuset would
        assert cpu_threads(0) == 1  # not os.cpu_count()
    finally:
        os.sched_setaffinity(0, original)
    monkeypatch.setattr("os.getloadavg", lambda: (float(len(original) - 1), 0.0, 0.0))
    assert cpu_threads(0) == 1  # every core but one busy with other jobs
    assert cpu_threads(2) == 2  # an explicit setting wins


# --------------------------------------------------------------------------------------------------
# 8. Search edge cases (the search ones are in test_search.py): text in any script, output_dir a file


def test_non_latin_text_and_emoji_are_drawn_as_glyphs_not_boxes() -> None:
    from PIL import Image, ImageDraw

    from irra_dist.visualize import TextFont, _codepoints, font_chain_files

    font = TextFont(16)

    def bitmap(char: str) -> bytes:
        image = Image.new("L", (40, 40), 0)
        font.draw(ImageDraw.Draw(image), (4, 4), char, fill=255)
        return image.tobytes()

    def covered(char: str) -> bool:
        return any(ord(char) in (_codepoints(path) or ()) for path in font_chain_files())

    # A missing glyph is drawn as the same empty box for every character: distinct characters must differ.
    cyrillic = "ЖИЗНЬ"  # DejaVu Sans (Debian fonts-dejavu-core, also in matplotlib) has these
    assert all(covered(c) for c in cyrillic), "no font with Cyrillic found: install fonts-dejavu-core"
    assert len({bitmap(c) for c in cyrillic}) == len(cyrillic)
    for text in ("行人走", "🙂🧥👟"):  # with fonts-noto-cjk / fonts-symbola / fonts-unifont installed
        drawn = [c for c in text if covered(c)]
        assert len({bitmap(c) for c in drawn}) == len(drawn)
        assert all(len(bitmap(c)) == 1600 for c in text)  # characters no font has still draw (a box)


def test_output_dir_that_is_a_file_is_one_line(tiny_recipe: Path, capsys) -> None:
    not_a_folder = tiny_recipe.parent / "runs.txt"
    not_a_folder.write_text("a file\n")
    assert train_main(["--config", str(tiny_recipe), f"train.output_dir={not_a_folder}"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "train.output_dir" in line and str(not_a_folder) in line
    assert not_a_folder.read_text() == "a file\n"



# --------------------------------------------------------------------------------------------------
# 11. The DeepSpeed launcher configs: process count against the machine, usable from any directory


def test_more_processes_than_the_machine_has_is_refused_or_warned(monkeypatch, caplog) -> None:
    from irra_dist.config import ConfigError
    from irra_dist.engine.accel import check_process_count

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # what deepspeed_zero{2,3}.yaml start unless told otherwise
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    check_process_count(cuda=False)  # runs on the CPU, but says what to pass
    assert any("8 processes share 2 usable CPU cores: pass --num_processes 2" in r.getMessage()
               for r in caplog.records)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # no GPU here: the count a 4-GPU machine has
    with pytest.raises(ConfigError, match="8 processes on this machine but it has 4 GPU.*--num_processes 4"):
        check_process_count(cuda=True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    check_process_count(cuda=True)


def test_deepspeed_json_of_the_launcher_config_is_found_from_another_directory(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    from irra_dist.engine.accel import locate_deepspeed_json

    accelerate_config = yaml.safe_load((REPO / "accelerate_configs/deepspeed_zero3.yaml").read_text())
    relative = accelerate_config["deepspeed_config"]["deepspeed_config_file"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", relative)  # as accelerate launch exports it
    locate_deepspeed_json()
    assert Path(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]) == REPO / relative
