"""What every bench script shares: the command line, the table, the JSON output and fresh-process workers.

A bench module defines ``run(quick: bool, **options) -> list[dict]`` and a one-line
``main(argv=None)`` that returns ``bench_main(run, __doc__, argv, ...)``: :func:`bench_main` parses
``--quick`` and ``--json PATH`` (plus the module's own options, passed to ``run`` by name), prints the rows
with :func:`format_table` and writes them atomically. Modules that measure in a fresh interpreter (peak
memory must not leak between measurements) use :func:`measure_in_subprocess` and hand their worker to
:func:`bench_main`, which serves the hidden ``--_worker`` command line.

Importing this module also puts the repository root on ``sys.path``, so that ``python bench/bench_x.py``
finds ``irra_dist`` in a checkout that was not pip-installed; the bench folder itself is ``sys.path[0]``
whenever a bench script runs (directly, or through ``bench/run_all.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(1, str(REPO_ROOT))

from irra_dist.fileio import atomic_write_text  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "irra_dist": {"attn_impl": "sdpa", "mlm_logits_at_masked_only": True},
    "naive": {"attn_impl": "math", "mlm_logits_at_masked_only": False},
}
"""The two IRRA models the step benchmarks compare (``build_irra`` options): irra_dist's and the official
computation (explicit-softmax attention, MLM logits at every position, a second text-tower pass: see
:func:`variant_batch`)."""
MASKED_CAPTIONS_ONCE = {"irra_dist": True, "naive": False}
"""Whether a variant's batches carry the masked captions once, as ``caption_ids`` (irra_dist's loaders with
data.mask_global_text: one text-tower pass), or also as ``mlm_ids`` (the text tower runs twice)."""
BASELINE = "naive"
WORKER_FLAG = "--_worker"
"""First argument of the command line that runs one measurement of a module in a fresh interpreter."""
ROW_COLUMNS = ("name", "value", "unit", "baseline", "ratio")
_NUMERIC = ("value", "baseline", "ratio")
_DEFAULT_LABELS = {"name": "metric"}

Row = dict[str, Any]
Option = tuple[str, dict[str, Any]]
"""An extra command-line option: its flag and the keyword arguments of ``ArgumentParser.add_argument``."""


def variant_batch(batch: Mapping[str, Any], variant: str) -> dict[str, Any]:
    """`batch` (``caption_ids`` and masked ``mlm_ids``) as `variant` gets it: irra_dist's the masked captions
    once, as ``caption_ids``; the naive one unchanged."""
    if not MASKED_CAPTIONS_ONCE[variant]:
        return dict(batch)
    out = {k: v for k, v in batch.items() if k != "mlm_ids"}
    out["caption_ids"] = batch["mlm_ids"]
    return out


def format_value(value: Any) -> str:
    """A table cell: floats to 4 significant digits, None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_ratio(ratio: float | None) -> str:
    """A ratio cell: ``x1.23``, or "-" where there is none."""
    return "-" if ratio is None else f"x{ratio:.3g}"


def format_table(
    rows: Sequence[Row],
    *,
    leading: Sequence[str] = (),
    extra: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
) -> str:
    """Plain-text table of bench rows: name, value, unit, baseline, ratio, with optional more columns.

    Args:
        rows: Bench rows (dicts with at least the keys of ``ROW_COLUMNS``).
        leading: Row keys shown before the name (e.g. ``benchmark`` in run_all's combined table).
        extra: Row keys shown after the ratio (details such as the method or a note); missing ones print "-".
        labels: Header text per key where it differs from the key, e.g. ``{"value": "irra_dist"}``; the
            name column is headed ``metric`` unless relabelled.

    Returns:
        The table, numbers right-aligned to 4 significant digits, the ratio written ``x1.23``.
    """
    keys = [*leading, *ROW_COLUMNS, *extra]
    header_labels = {**_DEFAULT_LABELS, **(labels or {})}
    header = [header_labels.get(k, k) for k in keys]

    body = [[format_ratio(r.get(k)) if k == "ratio" else format_value(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(keys))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if k in _NUMERIC else c.ljust(w) for k, c, w in zip(keys, cells, widths)
        ).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(b) for b in body])


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` through a temporary file renamed into place."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def bench_main(
    run: Callable[..., list[Row]],
    description: str | None,
    argv: Sequence[str] | None = None,
    *,
    extra_args: Sequence[Option] = (),
    labels: Mapping[str, str] | None = None,
    extra_columns: Sequence[str] = (),
    footer: Callable[[list[Row]], str] | None = None,
    worker: Callable[[list[str]], dict[str, Any]] | None = None,
) -> int:
    """The command line of a bench script: ``[--quick] [--json PATH]`` plus the module's own options.

    Args:
        run: The module's ``run(quick, **options)``; each option in `extra_args` is passed by its argparse
            destination name (``--baseline-max-gib`` as ``baseline_max_gib``; set ``dest`` to rename).
        description: The module docstring; its first line heads ``--help``.
        argv: Arguments (default ``sys.argv[1:]``).
        extra_args: The module's own options as ``(flag, add_argument keywords)``.
        labels: Table header per row key where it differs from the key (see :func:`format_table`).
        extra_columns: Row keys printed after the ratio.
        footer: Builds a line printed under the table from the rows (what the ratio means, the setup).
        worker: Serves ``WORKER_FLAG ARG... OUT``: called with the ARGs, its dict is written to OUT as JSON
            (the child side of :func:`measure_in_subprocess`).

    Returns:
        The exit status, 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if worker is not None and argv[:1] == [WORKER_FLAG]:
        write_json(Path(argv[-1]), worker(argv[1:-1]))
        return 0
    parser = argparse.ArgumentParser(description=(description or "").strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a reduced run, well under a minute")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this path")
    option_names = [parser.add_argument(flag, **kwargs).dest for flag, kwargs in extra_args]
    args = parser.parse_args(argv)
    rows = run(args.quick, **{name: getattr(args, name) for name in option_names})
    print(format_table(rows, extra=extra_columns, labels=labels))
    if footer is not None:
        print(footer(rows))
    if args.json is not None:
        write_json(args.json, rows)
        print(f"wrote {args.json}")
    return 0


def measure_in_subprocess(
    script: str | os.PathLike, args: Sequence[str], env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Run one measurement of `script` in a fresh interpreter and return the dict its worker wrote.

    A fresh process per measurement keeps one measurement's peak memory, allocator caches and threads out
    of the next one. The script must call :func:`bench_main` with a ``worker``.

    Args:
        script: The bench script (usually ``__file__``).
        args: Its worker's arguments, as strings.
        env: Extra environment variables for the child (e.g. allocator settings).

    Raises:
        subprocess.CalledProcessError: the worker failed (its output went to this process's stderr).
    """
    child_env = dict(os.environ, **(env or {}))
    # The repository for irra_dist, the bench folder for this module (a script outside bench/ imports it too).
    paths = [str(REPO_ROOT), str(BENCH_DIR), os.environ.get("PYTHONPATH")]
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    with tempfile.TemporaryDirectory(prefix="bench_worker_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(script).resolve()), WORKER_FLAG, *map(str, args), str(out)]
        subprocess.run(cmd, check=True, env=child_env, cwd=REPO_ROOT)
        return json.loads(out.read_text())


def proc_kib(path: str, field: str) -> int:
    """A ``Field:  N kB`` entry of a /proc file (Linux only), in KiB."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from {path}: the memory figures need Linux's /proc")


def reset_peak_rss() -> int:
    """Reset this process's peak resident set (VmHWM) to the current one; returns the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return proc_kib("/proc/self/status", "VmRSS") * 1024


def peak_rss_growth(base: int) -> int:
    """Bytes by which the peak resident set has grown above `base` (from :func:`reset_peak_rss`)."""
    return max(proc_kib("/proc/self/status", "VmHWM") * 1024 - base, 0)
