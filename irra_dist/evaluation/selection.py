"""Which epoch a selection rule picks and the test metrics reported for it, from ``metrics.jsonl`` rows.

Three rules are reported (docs/TRAINING.md, "Model selection"):

- ``best_on_val``: the epoch with the best validation t2i R1 (the first one on ties, as the trainer keeps
  `best` only on a strict improvement); its **test** metrics. A run that selects on val evaluated test once,
  at the end, on that checkpoint (a ``final`` row); a run that selects on test and tracks val has both
  splits at every evaluated epoch.
- ``best_on_test``: the epoch with the best test t2i R1 and its test metrics: what the official code and the
  paper report. Optimistic (the test split chose the epoch); only runs that evaluate test every epoch have it.
- ``last``: the last epoch's test metrics.

Rows (written by :class:`irra_dist.engine.trainer.Trainer`)::

    {"kind": "eval", "epoch": e, "split": "val"|"test", "selects": bool, "metrics": {"t2i": {...}}}
    {"kind": "final", "epoch": e, "split": "test", "weights": "best"|"last", "selected_on": "val",
     "metrics": {"t2i": {...}}}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from irra_dist.evaluation.metrics import METRIC_COLUMNS

RULES = ("best_on_val", "best_on_test", "last")
METRIC_NAMES = METRIC_COLUMNS
RULE_TITLES = {"best_on_val": "best-on-val", "best_on_test": "best-on-test (optimistic)", "last": "last"}


def eval_curves(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """``{split: {epoch: t2i metrics}}`` of the per-epoch evaluations (a later row wins for an epoch)."""
    curves: dict[str, dict[int, dict[str, float]]] = {}
    for row in rows:
        if row.get("kind") == "eval":
            curves.setdefault(row["split"], {})[int(row["epoch"])] = dict(row["metrics"]["t2i"])
    return {split: dict(sorted(by_epoch.items())) for split, by_epoch in curves.items()}


def _first_best(by_epoch: Mapping[int, Mapping[str, float]]) -> int:
    """The earliest epoch with the highest R1 (the trainer replaces `best` only on a strict improvement)."""
    best_epoch, best_r1 = -1, float("-inf")
    for epoch in sorted(by_epoch):
        if by_epoch[epoch]["R1"] > best_r1:
            best_epoch, best_r1 = epoch, by_epoch[epoch]["R1"]
    return best_epoch


def select_results(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The test metrics each rule reports for one run.

    Args:
        rows: the run's ``metrics.jsonl`` rows (:func:`irra_dist.engine.runlog.read_metrics`).

    Returns:
        ``{rule: {"epoch": int, "metrics": {"R1": ..., "mINP": ...}}}`` for the rules the run recorded
        (a subset of :data:`RULES`); metrics are t2i on the test split, in percent.
    """
    rows = list(rows)
    curves = eval_curves(rows)
    finals = {row["weights"]: row for row in rows
              if row.get("kind") == "final" and row.get("split") == "test"}
    test, val = curves.get("test", {}), curves.get("val", {})
    out: dict[str, dict[str, Any]] = {}

    best = finals.get("best")
    if best is not None and best.get("selected_on") == "val":
        out["best_on_val"] = {"epoch": int(best["epoch"]), "metrics": dict(best["metrics"]["t2i"])}
    elif val and test:
        epoch = _first_best(val)
        if epoch in test:
            out["best_on_val"] = {"epoch": epoch, "metrics": dict(test[epoch])}
    if test:
        epoch = _first_best(test)
        out["best_on_test"] = {"epoch": epoch, "metrics": dict(test[epoch])}
    if "last" in finals:
        last = finals["last"]
        out["last"] = {"epoch": int(last["epoch"]), "metrics": dict(last["metrics"]["t2i"])}
    elif test:
        epoch = max(test)
        out["last"] = {"epoch": epoch, "metrics": dict(test[epoch])}
    return {rule: out[rule] for rule in RULES if rule in out}
