"""irra-report on run folders fabricated here (metrics.jsonl written by the test): means and sample stds
against a hand computation, the epoch each selection rule picks, refusals of mixed and unfinished runs, the
PNG."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from irra_dist.config import config_from_dict, save_config
from irra_dist.engine.report import main as report_main
from irra_dist.evaluation.selection import select_results

# Test-selected runs that also record val (the irra_official protocol), 3 epochs each. R1 by epoch:
VAL_R1 = {1: [40, 55, 50], 2: [60, 50, 60], 3: [30, 35, 45]}
TEST_R1 = {1: [42, 48, 58], 2: [50, 61, 52], 3: [57, 40, 44]}
# By hand: best val R1 at epochs 2, 1 (tie 60/60: the first), 3 -> test R1 48, 50, 44;
#          best test R1 at epochs 3, 2, 1 -> 58, 61, 57;  last epoch (3) -> 58, 52, 44.
# best-on-val: mean 142/3; squared deviations (2/3)^2 + (8/3)^2 + (10/3)^2 = 168/9; sample var 84/9.
# best-on-test: mean 176/3; (2/3)^2 + (7/3)^2 + (5/3)^2 = 78/9; var 39/9.
# last: mean 154/3; (20/3)^2 + (2/3)^2 + (22/3)^2 = 888/9; var 444/9.
EXPECTED = {"best_on_val": (142 / 3, math.sqrt(84) / 3, "2 1 3"),
            "best_on_test": (176 / 3, math.sqrt(39) / 3, "3 2 1"),
            "last": (154 / 3, math.sqrt(444) / 3, "3 3 3")}


def _metrics(r1: float) -> dict:
    """Every metric a fixed offset from R1, so each column's mean is R1's plus the offset, its std R1's."""
    return {"t2i": {"R1": r1, "R5": r1 + 10, "R10": r1 + 20, "mAP": r1 - 5, "mINP": r1 - 20}}


def _fabricate(folder: Path, seed: int, *, recipe: str = "fab", split: str = "test", rows: list[dict],
               complete: bool = True) -> Path:
    folder.mkdir(parents=True)
    tracked = ["val"] if split == "test" else []
    save_config(config_from_dict({"name": recipe, "train": {"seed": seed, "num_epochs": 3},
                                  "optim": {"warmup_epochs": 1},
                                  "eval": {"split": split, "track_splits": tracked}}), folder / "config.yaml")
    head = {"kind": "run", "step": 0, "recipe": recipe, "dataset": "ICFG-PEDES",
            "annotation_sha256": "ab" * 32, "val_from_train": {"num_ids": 300, "rule": "r", "ids": []},
            "seed": seed, "num_epochs": 3}
    tail = [{"kind": "complete", "epoch": 3, "step": 30}] if complete else []
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [head, *rows, *tail]))
    return folder


def _official_rows(seed: int) -> list[dict]:
    rows = []
    for epoch in (1, 2, 3):
        rows.append({"kind": "train", "epoch": epoch, "step": 10 * epoch, "loss": 1.0})
        rows.append({"kind": "eval", "epoch": epoch, "step": 10 * epoch, "split": "test", "selects": True,
                     "metrics": _metrics(TEST_R1[seed][epoch - 1])})
        rows.append({"kind": "eval", "epoch": epoch, "step": 10 * epoch, "split": "val", "selects": False,
                     "metrics": _metrics(VAL_R1[seed][epoch - 1])})
    return rows


def _csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {row["selection"]: row for row in csv.DictReader(f)}


def test_best_on_val_picks_the_best_val_epoch_not_the_best_test_epoch() -> None:
    results = select_results(_official_rows(1))
    assert results["best_on_val"]["epoch"] == 2 and results["best_on_val"]["metrics"]["R1"] == 48
    assert results["best_on_test"]["epoch"] == 3 and results["best_on_test"]["metrics"]["R1"] == 58
    assert results["last"]["epoch"] == 3
    assert select_results(_official_rows(2))["best_on_val"]["epoch"] == 1  # a tie keeps the first epoch


def test_report_means_and_stds_equal_the_hand_computation(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    for seed in (1, 2, 3):
        _fabricate(sweep / f"seed{seed}", seed, rows=_official_rows(seed))
    out = tmp_path / "out"
    assert report_main([str(sweep), "--out", str(out)]) == 0
    table = _csv_rows(out / "report.csv")
    assert list(table) == ["best_on_val", "best_on_test", "last"]
    for rule, (mean, std, epochs) in EXPECTED.items():
        row = table[rule]
        assert row["n"] == "3" and row["epochs"] == epochs
        for metric, offset in (("R1", 0), ("R5", 10), ("R10", 20), ("mAP", -5), ("mINP", -20)):
            assert float(row[f"{metric}_mean"]) == pytest.approx(mean + offset, abs=1e-4)
            assert float(row[f"{metric}_std"]) == pytest.approx(std, abs=1e-4)
    markdown = (out / "report.md").read_text()
    assert f"| best-on-val | 3 | 2, 1, 3 | {142 / 3:.2f} ± {math.sqrt(84) / 3:.2f} |" in markdown
    assert markdown in capsys.readouterr().out
    with (out / "runs.csv").open() as f:
        per_run = list(csv.DictReader(f))
    assert len(per_run) == 9 and {r["seed"] for r in per_run} == {"1", "2", "3"}
    with Image.open(out / "curves.png") as image:
        assert image.format == "PNG" and image.size == (1210, 462)  # 11 x 4.2 inches at 110 dpi


def test_val_selected_runs_report_the_final_test_rows(tmp_path: Path) -> None:
    # Val-selected runs see test once, at the end: best (chosen on val) and last. No best-on-test exists.
    runs = []
    for seed, (best_epoch, best_r1, last_r1) in {1: (2, 70.0, 66.0), 2: (3, 74.0, 74.0)}.items():
        rows = [{"kind": "eval", "epoch": e, "step": e, "split": "val", "selects": True,
                 "metrics": _metrics(50.0 + 10 * (e == best_epoch))} for e in (1, 2, 3)]
        rows += [{"kind": "final", "epoch": 3, "step": 3, "split": "test", "weights": "last",
                  "selected_on": "val", "metrics": _metrics(last_r1)},
                 {"kind": "final", "epoch": best_epoch, "step": 3, "split": "test", "weights": "best",
                  "selected_on": "val", "metrics": _metrics(best_r1)}]
        runs.append(_fabricate(tmp_path / f"seed{seed}", seed, split="val", rows=rows))
    out = tmp_path / "out"
    assert report_main([*map(str, runs), "--out", str(out)]) == 0
    table = _csv_rows(out / "report.csv")
    assert list(table) == ["best_on_val", "last"]
    assert table["best_on_val"]["epochs"] == "2 3"
    assert float(table["best_on_val"]["R1_mean"]) == pytest.approx(72.0)
    assert float(table["best_on_val"]["R1_std"]) == pytest.approx(math.sqrt(8), abs=1e-4)  # (2^2 + 2^2) / 1
    assert float(table["last"]["R1_mean"]) == pytest.approx(70.0)
    assert float(table["last"]["R1_std"]) == pytest.approx(math.sqrt(32), abs=1e-4)  # (4^2 + 4^2) / 1


@pytest.mark.parametrize("problem", ["recipe", "unfinished"])
def test_mixed_or_unfinished_runs_are_refused_in_one_line(tmp_path: Path, capsys, problem: str) -> None:
    a = _fabricate(tmp_path / "a", 1, rows=_official_rows(1))
    b = _fabricate(tmp_path / "b", 2, rows=_official_rows(2),
                   recipe="other" if problem == "recipe" else "fab", complete=problem != "unfinished")
    out = tmp_path / "out"
    assert report_main([str(a), str(b), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert ("mix recipes: fab" in err) if problem == "recipe" else ("is not finished" in err)
    assert not out.exists()  # nothing half-written
    if problem == "recipe":
        assert report_main([str(a), str(b), "--out", str(out), "--allow-mixed"]) == 0
        assert (out / "report.md").is_file()
