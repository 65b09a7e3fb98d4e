"""``irra-sweep --seeds 1 2 3 [--parallel-gpus] -- <irra-train arguments>``: a run per seed, then the report.

Every run is ``irra-train <arguments> train.seed=S`` in its own process, written to
``<train.output_dir>/<sweep name>/seed<S>`` and put in the W&B group ``<sweep name>``. Runs go one after
the other, with ``--parallel-gpus`` one per free GPU at a time (``CUDA_VISIBLE_DEVICES`` set per run; free:
no compute process on it, as ``nvidia-smi`` reports, unless ``--gpus`` names them), or ``--jobs N`` at a time
without GPU pinning. When they are
done, :mod:`irra_dist.engine.report` writes report.md, report.csv, runs.csv and curves.png into the sweep
folder. A seed whose run fails is named at the end and the exit status is 1; the others are still reported.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from irra_dist.config import ConfigError
from irra_dist.data.shards import MANIFEST_NAME
from irra_dist.engine.cli import EXIT_BAD_INPUT, load_train_config, train_parser

# A run is `python -c <this>`: the same entry point as irra-train, without relying on console scripts.
_TRAIN_ENTRY = "import sys; from irra_dist.engine.cli import train_main; sys.exit(train_main())"
_SET_BY_SWEEP = ("train.seed", "train.run_name", "train.output_dir", "logging.group")


def free_gpus() -> list[str]:
    """Indices of the visible GPUs without a compute process (``nvidia-smi``); [] without nvidia-smi."""
    def query(*args: str) -> list[list[str]]:
        out = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]

    try:
        gpus = query("--query-gpu=index,uuid")
        busy = {row[0] for row in query("--query-compute-apps=gpu_uuid")}
    except (OSError, subprocess.SubprocessError):
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    allowed = None if visible is None else {v.strip() for v in visible.split(",")}
    return [index for index, uuid in gpus if uuid not in busy and (allowed is None or index in allowed
                                                                     or uuid in allowed)]


def seed_command(train_args: Sequence[str], seed: int, sweep_dir: Path, group: str) -> list[str]:
    """The command line of one seed's run."""
    return [sys.executable, "-c", _TRAIN_ENTRY, *train_args, f"train.seed={seed}",
            f"train.run_name=seed{seed}", f"train.output_dir={sweep_dir}", f"logging.group={group}"]


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_seeds(commands: dict[int, list[str]], slots: Sequence[str | None], sweep_dir: Path) -> dict[int, int]:
    """Run the seeds' commands, at most one per slot at a time (a slot is a GPU index, or None: no
    restriction); returns each seed's exit status. With one slot the output goes to the console, with
    several to ``sweep_dir/seed<S>.log``."""
    pending = list(commands)
    running: dict[int, tuple[subprocess.Popen, str | None]] = {}
    free = list(slots)
    status: dict[int, int] = {}
    logs = []
    try:
        while pending or running:
            while pending and free:
                seed, slot = pending.pop(0), free.pop(0)
                env = dict(os.environ)
                if slot is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slot
                out = None
                if len(slots) > 1:
                    out = open(sweep_dir / f"seed{seed}.log", "w")  # noqa: SIM115 -- closed below
                    logs.append(out)
                where = f" on GPU {slot}" if slot is not None else ""
                print(f"irra-sweep: seed {seed}{where}" + (f", log {out.name}" if out else ""), flush=True)
                proc = subprocess.Popen(commands[seed], env=env, stdout=out,
                                        stderr=subprocess.STDOUT if out else None, start_new_session=True)
                running[seed] = (proc, slot)
            for seed, (proc, slot) in list(running.items()):
                if proc.poll() is not None:
                    status[seed] = proc.returncode
                    del running[seed]
                    free.append(slot)
            if running:
                time.sleep(0.5)
    finally:
        for proc, _ in running.values():
            _kill(proc)
        for out in logs:
            out.close()
    return status


def sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irra-sweep",
        usage="irra-sweep --seeds S [S ...] [--parallel-gpus] [--name NAME] -- [irra-train arguments]",
        description="Train one run per seed (same recipe and overrides), grouped in W&B, then write the "
                    "report (irra-report) into the sweep folder.")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="one run per seed")
    parser.add_argument("--parallel-gpus", action="store_true",
                        help="run the seeds at once, one per free GPU (queued when there are fewer GPUs)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="without --parallel-gpus: run up to N seeds at once (e.g. on a CPU machine)")
    parser.add_argument("--gpus", default=None, metavar="0,1,...",
                        help="with --parallel-gpus: the GPU indices to use (default: those without a "
                             "process)")
    parser.add_argument("--name", default=None,
                        help="sweep name: folder under train.output_dir and W&B group (default: "
                             "<timestamp>_<recipe>_sweep)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``irra-sweep``: 0 when every seed's run succeeded and the report was written; 1 when a run failed;
    2 on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = sweep_parser().parse_args(argv[:split])
    train_args = argv[split + 1:]
    try:
        if len(set(args.seeds)) != len(args.seeds):
            raise ConfigError(f"--seeds repeats a seed ({' '.join(map(str, args.seeds))}): give each seed "
                              "once")
        parsed = train_parser().parse_intermixed_args(train_args)
        if parsed.resume is not None:
            raise ConfigError("irra-sweep starts new runs: resume one seed with irra-train --resume RUN")
        taken = [o for o in parsed.overrides if o.split("=", 1)[0] in _SET_BY_SWEEP]
        if taken:
            raise ConfigError(f"irra-sweep sets {', '.join(_SET_BY_SWEEP)} itself: drop {', '.join(taken)} "
                              "(use --name for the folder and the W&B group)")
        overrides = list(parsed.overrides) + (["logging.wandb=false"] if parsed.no_wandb else [])
        cfg, _ = load_train_config(parsed.config, overrides, None)
    except SystemExit as exc:  # argparse already printed its message
        return EXIT_BAD_INPUT if exc.code else 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    name = args.name or f"{datetime.now():%Y%m%d_%H%M%S}_{cfg.name}_sweep"
    sweep_dir = Path(cfg.train.output_dir) / name
    if any((sweep_dir / f"seed{s}").exists() for s in args.seeds):
        print(f"error: {sweep_dir} already holds runs of these seeds: choose another --name", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.jobs < 1:
        print(f"error: --jobs {args.jobs}: pass 1 or more", file=sys.stderr)
        return EXIT_BAD_INPUT
    slots: list[str | None] = [None] * args.jobs
    if args.parallel_gpus:
        slots = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else free_gpus()
        if not slots:
            print("error: --parallel-gpus found no free GPU (nvidia-smi lists none without a process): pass "
                  "--gpus 0,1,... or run the seeds one after the other without --parallel-gpus",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
    sweep_dir.mkdir(parents=True, exist_ok=True)
    # A terminated sweep stops its runs too (they are in their own process groups): SIGTERM unwinds run_seeds.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    demo_missing = cfg.data.build_demo_if_missing and not (Path(cfg.data.shards) / MANIFEST_NAME).is_file()
    if len(slots) > 1 and demo_missing:
        # Once, here: runs started together would each try to generate the demo shards.
        from irra_dist.engine.trainer import build_demo_shards

        print(f"irra-sweep: generating the demo shards in {cfg.data.shards} first", flush=True)
        build_demo_shards(Path(cfg.data.shards), cfg.model.image_size)
    commands = {seed: seed_command(train_args, seed, sweep_dir, name) for seed in args.seeds}
    print(f"irra-sweep: {len(commands)} runs of {cfg.name} in {sweep_dir} (W&B group {name})", flush=True)
    status = run_seeds(commands, slots, sweep_dir)
    failed = [seed for seed in args.seeds if status.get(seed) != 0]
    done = [sweep_dir / f"seed{seed}" for seed in args.seeds if seed not in failed]
    if done:
        from irra_dist.engine.report import ReportError, write_report

        try:
            report = write_report(done, sweep_dir)
        except ReportError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(report["markdown"])
        print("wrote " + ", ".join(str(f) for f in report["files"]))
        if cfg.logging.wandb:
            from irra_dist.engine.report import log_report_to_wandb

            log_report_to_wandb(report, sweep_dir)
    if failed:
        print(f"error: the runs of seed(s) {' '.join(map(str, failed))} failed (exit status "
              f"{', '.join(str(status.get(s)) for s in failed)}); see their output above or "
              f"{sweep_dir}/seed<S>/train_log.txt", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
