"""Run every benchmark, print one table: `python bench/run_all.py [--quick] [--json PATH] [--only NAME ...]`.

Each `bench/bench_*.py` module exposes `run(quick: bool) -> list[dict]`. Every module runs in its own
subprocess, so one module's memory, threads and data-loader workers cannot disturb the next one's timings,
its peak resident memory can be measured, and a crash or a hang becomes a failed row instead of ending the
run. `bench/gpu_step.py` (needs CUDA) joins the set with `--gpu` or when named in `--only`.

The JSON written (default bench/results/latest.json) holds the machine, the command, per-module status and
every row, each tagged with its `benchmark`. The exit status is 1 when any module failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import format_ratio, format_table, format_value

from irra_dist.fileio import atomic_write_text

logger = logging.getLogger("bench.run_all")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_JSON = BENCH_DIR / "results" / "latest.json"
GPU_MODULE = "gpu_step"
REQUIRED_KEYS = ("name", "value", "unit", "baseline", "ratio")
# Per-module wall-clock limits; the brief budgets the whole run at 15 min (full) and 2 min (quick).
DEFAULT_TIMEOUT_S = {False: 600.0, True: 120.0}
# Lines of a failed module's output kept in its failed row.
ERROR_TAIL_LINES = 15


class BenchSelectionError(ValueError):
    """`--only` named a benchmark that does not exist; the message lists the ones that do."""


@dataclass
class ModuleResult:
    """Outcome of one benchmark module."""

    name: str
    ok: bool
    wall_s: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_mib: float | None = None
    error: str = ""


def discover(bench_dir: Path = BENCH_DIR) -> list[str]:
    """Names (file stems) of the `bench_*.py` modules in `bench_dir`, sorted."""
    return sorted(p.stem for p in bench_dir.glob("bench_*.py"))


def select(
    available: list[str], only: list[str] | None, *, gpu: bool, bench_dir: Path = BENCH_DIR
) -> list[str]:
    """The modules to run: all discovered ones (plus gpu_step with `gpu`), or those named in `only`.

    A name in `only` may omit the `bench_` prefix.

    Raises:
        BenchSelectionError: a name in `only` matches no module.
    """
    candidates = list(available)
    if (bench_dir / f"{GPU_MODULE}.py").exists():
        candidates.append(GPU_MODULE)
    if not only:
        return available + ([GPU_MODULE] if gpu and GPU_MODULE in candidates else [])
    chosen = []
    for name in only:
        match = next((c for c in candidates if name in (c, c.removeprefix("bench_"))), None)
        if match is None:
            raise BenchSelectionError(
                f"--only {name}: no such benchmark in {bench_dir}; choose from {', '.join(candidates)}"
            )
        if match not in chosen:
            chosen.append(match)
    return chosen


def validate_rows(rows: Any) -> str:
    """An empty string when `rows` follows the bench contract, else one line saying what is wrong."""
    if not isinstance(rows, list) or not rows:
        return f"run() must return a non-empty list of dicts, got {type(rows).__name__} {rows!r:.80}"
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            return f"row {i} is a {type(row).__name__}, not a dict"
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            return f"row {i} ({row.get('name', '?')}) lacks the keys {missing}"
        if not isinstance(row["value"], (int, float)) or isinstance(row["value"], bool):
            return f"row {i} ({row['name']}) has a non-numeric value {row['value']!r}"
        for key in ("baseline", "ratio"):
            if row[key] is not None and not isinstance(row[key], (int, float)):
                return f"row {i} ({row['name']}) has a non-numeric {key} {row[key]!r}"
    return ""


def _peak_rss_mib() -> float:
    """Peak resident memory of this process and of its waited-for children (data-loader workers), MiB."""
    # Linux reports ru_maxrss in KiB.
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


def _worker(module_path: Path, quick: bool, out_path: Path) -> None:
    """Subprocess body: import one bench module, call run(quick), write its rows and peak memory as JSON."""
    for path in (str(module_path.parent), str(REPO_ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    spec = importlib.util.spec_from_file_location(module_path.stem, module_path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {module_path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_path.stem] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "run", None)):
        raise AttributeError(f"{module_path.name} has no run(quick) function")
    rows = module.run(quick)
    payload = {"rows": rows, "peak_rss_mib": _peak_rss_mib()}
    # NaN/inf become null so the JSON stays standard; validate_rows then names the offending row.
    out_path.write_text(json.dumps(_finite_or_none(payload), default=str))


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def _tail(text: str, lines: int = ERROR_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_module(name: str, quick: bool, timeout_s: float, bench_dir: Path = BENCH_DIR) -> ModuleResult:
    """Run one bench module in a fresh interpreter and collect its rows; never raises for a module failure."""
    module_path = bench_dir / f"{name}.py"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as tmp:
        out_path = Path(tmp) / "rows.json"
        log_path = Path(tmp) / "output.log"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--_worker",
            str(module_path),
            "--_out",
            str(out_path),
        ] + (["--quick"] if quick else [])
        start = time.perf_counter()
        with open(log_path, "w") as log:
            # A new session makes the module and any workers it forks one process group, killed together.
            proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                returncode = None
        wall_s = time.perf_counter() - start
        output = log_path.read_text(errors="replace")
        if returncode is None:
            return ModuleResult(
                name,
                False,
                wall_s,
                error=f"timed out after {timeout_s:.0f} s; "
                f"raise --timeout or shorten the module\n{_tail(output)}",
            )
        if returncode != 0:
            return ModuleResult(name, False, wall_s, error=f"exit status {returncode}\n{_tail(output)}")
        try:
            payload = json.loads(out_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            return ModuleResult(name, False, wall_s, error=f"no readable result ({exc})\n{_tail(output)}")
    problem = validate_rows(payload.get("rows"))
    if problem:
        return ModuleResult(name, False, wall_s, error=problem)
    return ModuleResult(name, True, wall_s, rows=payload["rows"], peak_rss_mib=payload.get("peak_rss_mib"))


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, Python/torch versions, git commit and the date (UTC)."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": None,
        # Other processes on a shared machine slow every figure; the load average records how busy it was.
        "load_avg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").open()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    try:
        kib = next(
            int(line.split()[1]) for line in Path("/proc/meminfo").open() if line.startswith("MemTotal")
        )
        info["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    for package in ("torch", "accelerate", "deepspeed", "webdataset"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    try:
        info["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.TimeoutExpired):
        info["git_commit"] = None
    return info


def result_rows(results: list[ModuleResult]) -> list[dict[str, Any]]:
    """All rows, each tagged with its benchmark; a failed module contributes one row with `failed` set."""
    rows = []
    for result in results:
        if result.ok:
            rows.extend({"benchmark": result.name, **row} for row in result.rows)
        else:
            rows.append(
                {
                    "benchmark": result.name,
                    "name": "FAILED",
                    "value": None,
                    "unit": "",
                    "baseline": None,
                    "ratio": None,
                    "failed": True,
                    "error": result.error,
                }
            )
    return rows


def format_markdown(payload: dict[str, Any]) -> str:
    """Markdown for docs/BENCHMARKS.md: the machine, the command, then one table per benchmark."""
    m = payload["machine"]
    lines = [
        f"Measured {m['date']} on {m['cpu_model']} ({m['cpu_cores']} cores, {m['memory_gib']} GiB), "
        f"load average {m['load_avg_1m_5m_15m'][0]} at the start, torch {m['torch']}, "
        f"commit {m['git_commit']}: `{payload['command']}`",
    ]
    for module in payload["modules"]:
        lines += [
            "",
            f"#### {module['name']} ({module['wall_s']:.0f} s, "
            f"peak RSS {format_value(module['peak_rss_mib'])} MiB)",
            "",
        ]
        if not module["ok"]:
            lines.append(f"FAILED: {module['error'].splitlines()[0]}")
            continue
        lines += ["| metric | value | unit | baseline | ratio |", "|---|---:|---|---:|---:|"]
        for r in payload["rows"]:
            if r["benchmark"] == module["name"]:
                cells = [r["name"], format_value(r["value"]), r["unit"], format_value(r["baseline"]),
                         format_ratio(r["ratio"])]
                lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced runs (the whole set well under 2 min)")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"output JSON (default {DEFAULT_JSON})"
    )
    parser.add_argument("--markdown", type=Path, help="also write the tables as Markdown to this file")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these (e.g. data model_step)")
    parser.add_argument("--gpu", action="store_true", help=f"also run {GPU_MODULE}.py (needs CUDA)")
    parser.add_argument("--timeout", type=float, help="per-module limit in seconds (default 600, quick 120)")
    parser.add_argument("--bench-dir", type=Path, default=BENCH_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--_worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks, print the table, write the JSON; 1 if any module failed."""
    args = parse_args(argv)
    if args._worker is not None:
        _worker(args._worker, args.quick, args._out)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bench_dir = args.bench_dir.resolve()
    try:
        names = select(discover(bench_dir), args.only, gpu=args.gpu, bench_dir=bench_dir)
    except BenchSelectionError as exc:
        logger.error("error: %s", exc)
        return 2
    if not names:
        logger.error("error: no bench_*.py module in %s; nothing to run", bench_dir)
        return 2
    timeout_s = args.timeout if args.timeout is not None else DEFAULT_TIMEOUT_S[args.quick]
    # Taken before the run, so the date is the start and the load average is that of the other processes.
    machine = machine_info()
    results = []
    for name in names:
        logger.info("running %s%s ...", name, " (quick)" if args.quick else "")
        result = run_module(name, args.quick, timeout_s, bench_dir)
        status = "ok" if result.ok else "FAILED"
        logger.info("  %s in %.1f s", status, result.wall_s)
        results.append(result)

    rows = result_rows(results)
    print(format_table(rows, leading=("benchmark",)))
    print()
    print("module            status   wall s  peak RSS MiB")
    for r in results:
        status = "ok" if r.ok else "FAILED"
        print(f"{r.name:<17} {status:<7} {r.wall_s:7.1f}  {format_value(r.peak_rss_mib):>12}")
    for r in results:
        if not r.ok:
            print(f"\n{r.name} failed: {r.error}")
    payload = {
        "command": " ".join(["python", "bench/run_all.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "quick": args.quick,
        "machine": machine,
        "modules": [
            {
                "name": r.name,
                "ok": r.ok,
                "wall_s": round(r.wall_s, 2),
                "peak_rss_mib": r.peak_rss_mib,
                "error": r.error,
            }
            for r in results
        ],
        "rows": rows,
    }
    atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    if args.markdown is not None:
        atomic_write_text(args.markdown, format_markdown(payload))
        print(f"wrote {args.markdown}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
