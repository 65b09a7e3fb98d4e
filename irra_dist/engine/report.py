"""``irra-report RUN... [--out DIR]``: mean +/- std over runs (seeds) of the test metrics per selection rule.

Reads each run folder's ``metrics.jsonl`` (and ``config.yaml``) and writes into ``--out``:

- ``report.md``: a markdown table, one row per selection rule (best-on-val, best-on-test where recorded,
  last) with the number of runs, the selected epochs and mean +/- sample std (n - 1) of R1/R5/R10/mAP/mINP
  on the test split, text-to-image;
- ``report.csv``: the same numbers; ``runs.csv``: every run's values;
- ``curves.png``: R1 and mAP by epoch, one line per run (seed) and evaluated split, a star at the test
  result of the epoch chosen on val.

The rules are :mod:`irra_dist.evaluation.selection`'s. Runs of different recipes, datasets or selection
splits are refused unless ``--allow-mixed``; unfinished runs are refused. ``--wandb`` also logs the table
(a W&B table) and the curves into a run of the runs' W&B group.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from irra_dist.config import ConfigError, load_config
from irra_dist.engine.runlog import CONFIG_FILE, METRICS_FILE, read_metrics
from irra_dist.evaluation.selection import METRIC_NAMES, RULE_TITLES, RULES, eval_curves, select_results
from irra_dist.fileio import atomic_write, atomic_write_text

EXIT_BAD_INPUT = 2
REPORT_MD, REPORT_CSV, RUNS_CSV, CURVES_PNG = "report.md", "report.csv", "runs.csv", "curves.png"
# Config keys that may differ between runs of one report without a note (they do not change the result).
_INCIDENTAL = ("train.seed", "train.run_name", "train.output_dir", "data.num_workers", "eval.batch_size",
               "logging.")


class ReportError(ValueError):
    """Run folders that cannot be reported together; one line naming the run and the fix."""


@dataclass
class RunRecord:
    """One run folder as the report sees it."""

    path: Path
    recipe: str
    dataset: str
    """The shard set's dataset name and annotation hash (plus the val identities carved from train)."""
    selection_split: str
    seed: int
    num_epochs: int
    complete: bool
    results: dict[str, dict[str, Any]]
    curves: dict[str, dict[int, dict[str, float]]]
    config: dict[str, Any] = field(default_factory=dict)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_run(path: Path) -> RunRecord:
    """Read one run folder.

    Raises:
        ReportError: no metrics.jsonl / config.yaml, or an unreadable config.
    """
    if not (path / METRICS_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise ReportError(f"{path} is not a run folder (no {METRICS_FILE} and {CONFIG_FILE}): pass run "
                          "folders written by irra-train, or a sweep folder holding them")
    try:
        cfg = load_config(path / CONFIG_FILE)
    except ConfigError as err:
        raise ReportError(f"{path / CONFIG_FILE} cannot be read ({err})") from None
    rows = read_metrics(path / METRICS_FILE)
    header = next((row for row in rows if row.get("kind") == "run"), None)
    if header is not None:
        carved = header.get("val_from_train") or {}
        dataset = f"{header['dataset']} (annotation {str(header['annotation_sha256'])[:12]}"
        dataset += f", {carved['num_ids']} train ids carved into val)" if carved else ")"
    else:  # a run written before the run row existed: its shard folder stands for the dataset
        dataset = cfg.eval_shards()
    curves = eval_curves(rows)
    evaluated = max((max(by_epoch) for by_epoch in curves.values()), default=0)
    complete = any(row.get("kind") == "complete" for row in rows) or (
        header is None and evaluated + cfg.eval.eval_period > cfg.train.num_epochs)
    return RunRecord(path=path, recipe=cfg.name, dataset=dataset, selection_split=cfg.eval.split,
                     seed=cfg.train.seed, num_epochs=cfg.train.num_epochs, complete=complete,
                     results=select_results(rows), curves=curves, config=_flatten(cfg.to_dict()))


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders named directly, or the run folders inside a named sweep folder (sorted by name)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / METRICS_FILE).is_file():
            found.append(path)
        elif path.is_dir() and (inner := sorted(p.parent for p in path.glob(f"*/{METRICS_FILE}"))):
            found.extend(inner)
        else:
            raise ReportError(f"{path} holds no run ({METRICS_FILE} not found in it or its sub-folders): "
                              "pass run folders or a sweep folder")
    return found


def check_comparable(runs: Sequence[RunRecord], allow_mixed: bool) -> list[str]:
    """Refuse runs of different recipes, datasets or selection splits (unless `allow_mixed`), and unfinished
    runs. Returns notes on other config keys that differ.

    Raises:
        ReportError: mixed or unfinished runs.
    """
    for run in runs:
        if not run.complete:
            raise ReportError(f"run {run.path} is not finished: complete it with irra-train --resume "
                              f"{run.path}, or leave it out of the report")
    first = runs[0]
    for what in ("recipe", "dataset", "selection_split"):
        other = next((r for r in runs if getattr(r, what) != getattr(first, what)), None)
        if other is not None and not allow_mixed:
            raise ReportError(f"the runs mix {what.replace('_', ' ')}s: {getattr(first, what)} "
                              f"({first.path}) and {getattr(other, what)} ({other.path}); report them "
                              "separately, or pass --allow-mixed")
    keys = sorted(set().union(*(r.config for r in runs)))
    differing = [k for k in keys if not k.startswith(_INCIDENTAL)
                 and len({repr(r.config.get(k)) for r in runs}) > 1]
    return [f"config values differ between runs: {', '.join(differing)}"] if differing else []


def aggregate(runs: Sequence[RunRecord]) -> dict[str, dict[str, Any]]:
    """Per rule: ``{"n", "epochs", "mean": {metric: x}, "std": {metric: x}}`` over the runs that have it.

    The std is the sample standard deviation (n - 1); nan for a single run.
    """
    out: dict[str, dict[str, Any]] = {}
    for rule in RULES:
        having = [r.results[rule] for r in runs if rule in r.results]
        if not having:
            continue
        values = {m: [h["metrics"][m] for h in having] for m in METRIC_NAMES}
        out[rule] = {"n": len(having), "epochs": [h["epoch"] for h in having],
                     "mean": {m: statistics.fmean(v) for m, v in values.items()},
                     "std": {m: statistics.stdev(v) if len(v) > 1 else math.nan for m, v in values.items()}}
    return out


def _cell(mean: float, std: float) -> str:
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def markdown_report(runs: Sequence[RunRecord], table: dict[str, dict[str, Any]], notes: Sequence[str]) -> str:
    """The report as markdown: a title line, the table, how it was computed, the runs."""
    first = runs[0]
    lines = [f"# {first.recipe}: {len(runs)} run(s)", "",
             f"Dataset: {first.dataset}; shards `{first.config.get('data.shards')}`. Best checkpoint "
             f"selected on the **{first.selection_split}** split during training.", "",
             "Test split, text-to-image, mean ± sample std (n - 1) over runs:", "",
             "| selection | n | epochs | " + " | ".join(METRIC_NAMES) + " |",
             "|---|---|---|" + "---|" * len(METRIC_NAMES)]
    for rule, row in table.items():
        cells = [_cell(row["mean"][m], row["std"][m]) for m in METRIC_NAMES]
        lines.append(f"| {RULE_TITLES[rule]} | {row['n']} | {', '.join(map(str, row['epochs']))} | "
                     + " | ".join(cells) + " |")
    lines += ["", "best-on-val: the epoch with the best val R1, its test metrics; best-on-test: the epoch "
              "with the best test R1 (the official/paper protocol; optimistic); last: the last epoch.", ""]
    lines += [f"Note: {note}." for note in notes]
    lines += ["", "Runs:", ""] + [f"- seed {r.seed}: `{r.path}`" for r in runs]
    return "\n".join(lines) + "\n"


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def summary_csv(table: dict[str, dict[str, Any]]) -> str:
    header = ["selection", "n", "epochs", *(f"{m}_{s}" for m in METRIC_NAMES for s in ("mean", "std"))]
    rows = [[rule, row["n"], " ".join(map(str, row["epochs"])),
             *(f"{row[s][m]:.4f}" for m in METRIC_NAMES for s in ("mean", "std"))]
            for rule, row in table.items()]
    return _csv_text(header, rows)


def runs_csv(runs: Sequence[RunRecord]) -> str:
    rows = [[str(r.path), r.seed, rule, res["epoch"], *(f"{res['metrics'][m]:.4f}" for m in METRIC_NAMES)]
            for r in runs for rule, res in r.results.items()]
    return _csv_text(["run", "seed", "selection", "epoch", *METRIC_NAMES], rows)


def plot_curves(runs: Sequence[RunRecord], out: Path) -> Path:
    """R1 and mAP by epoch: one line per run and evaluated split (solid: the selecting split; dashed: a
    recorded one); a star marks each run's test result at its best-on-val epoch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        for split, by_epoch in run.curves.items():
            style = "-" if split == run.selection_split else "--"
            for ax, metric in zip(axes, ("R1", "mAP")):
                ax.plot(list(by_epoch), [m[metric] for m in by_epoch.values()], style, color=color,
                        marker="o", markersize=3, label=f"seed {run.seed} ({split})")
        chosen = run.results.get("best_on_val")
        if chosen is not None:
            for ax, metric in zip(axes, ("R1", "mAP")):
                ax.plot([chosen["epoch"]], [chosen["metrics"][metric]], "*", color=color, markersize=12,
                        label=f"seed {run.seed} test @ best-on-val")
    for ax, metric in zip(axes, ("R1", "mAP")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"t2i {metric} (%)")
        ax.set_title(f"{metric} by epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{runs[0].recipe}: {len(runs)} run(s)")
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out


def write_report(run_paths: Sequence[str | Path], out_dir: str | Path, *, allow_mixed: bool = False,
                 ) -> dict[str, Any]:
    """Read the runs and write report.md, report.csv, runs.csv and curves.png into `out_dir`.

    Returns:
        ``{"runs": [RunRecord], "table": aggregate(...), "markdown": str, "files": [Path]}``.

    Raises:
        ReportError: see :func:`load_run`, :func:`find_runs`, :func:`check_comparable`.
    """
    runs = [load_run(p) for p in find_runs(run_paths)]
    notes = check_comparable(runs, allow_mixed)
    table = aggregate(runs)
    if not table:
        raise ReportError("no run recorded any test result (was the test split ever evaluated?): nothing to "
                          "report")
    out = Path(out_dir)
    markdown = markdown_report(runs, table, notes)
    files = [atomic_write_text(out / REPORT_MD, markdown),
             atomic_write_text(out / REPORT_CSV, summary_csv(table)),
             atomic_write_text(out / RUNS_CSV, runs_csv(runs)), plot_curves(runs, out / CURVES_PNG)]
    return {"runs": runs, "table": table, "markdown": markdown, "files": files}


def log_report_to_wandb(report: dict[str, Any], out_dir: Path) -> str:
    """Log the table (a W&B table) and the curves into a ``report`` run of the runs' W&B group; returns the
    mode (offline without credentials, see :func:`irra_dist.engine.tracking.resolve_wandb_mode`)."""
    import wandb

    from irra_dist.engine.tracking import resolve_wandb_mode

    first = report["runs"][0]
    mode = resolve_wandb_mode(first.config.get("logging.wandb_mode", "auto"))
    group = first.config.get("logging.group") or None
    run = wandb.init(project=first.config.get("logging.project", "irra_dist"),
                     entity=first.config.get("logging.entity") or None, group=group, job_type="report",
                     name=f"report-{group or first.recipe}", dir=str(out_dir), mode=mode)
    try:
        columns = ["selection", "n", "epochs", *(f"{m} {s}" for m in METRIC_NAMES for s in ("mean", "std"))]
        data = [[RULE_TITLES[rule], row["n"], " ".join(map(str, row["epochs"])),
                 *(row[s][m] for m in METRIC_NAMES for s in ("mean", "std"))]
                for rule, row in report["table"].items()]
        run.log({"report/test_t2i": wandb.Table(columns=columns, data=data),
                 "report/curves": wandb.Image(str(out_dir / CURVES_PNG))})
    finally:
        run.finish()
    return mode


def report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irra-report",
        description="Mean +/- std over runs (seeds) of the test metrics per selection rule: a markdown "
                    "table, CSV files and a PNG of R1 and mAP by epoch.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or a sweep folder holding them")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: the sweep folder when one is given, else ./report)")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="report runs of different recipes, datasets or selection splits together")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the table and the curves to W&B (the runs' project and group)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``irra-report``: print the markdown table; 2 on bad input (one ``error:`` line)."""
    args = report_parser().parse_args(argv)
    single = Path(args.runs[0])
    default_out = single if len(args.runs) == 1 and not (single / METRICS_FILE).is_file() else Path("report")
    out = Path(args.out) if args.out else default_out
    try:
        report = write_report(args.runs, out, allow_mixed=args.allow_mixed)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(report["markdown"])
    print("wrote " + ", ".join(str(f) for f in report["files"]))
    if args.wandb:
        mode = log_report_to_wandb(report, out)
        print(f"logged the report to W&B ({mode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
