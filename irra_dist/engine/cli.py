"""Command lines of the engine: ``irra-train`` (launch/train.py) and ``irra-eval`` (launch/evaluate.py).

Bad input (an unknown config key, a wrong type, missing shards, an unusable checkpoint) prints one line
``error: ...`` on the first process and exits with status 2; a run stopped by non-finite losses exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from irra_dist.config import Config, ConfigError, load_config, resolve_recipe
from irra_dist.fileio import atomic_write_text
from irra_dist.image_size import parse_image_size

DEFAULT_RECIPE = "demo"
"""configs/demo.yaml in the repository, so `accelerate launch launch/train.py` runs the demo."""

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 1
REPORT_GRACE_S = 3.0
"""How long the other processes wait after a bad-input error, so that the reporting one prints it."""
EXIT_INTERRUPTED = 130
"""128 + SIGINT, what a shell reports for a command stopped by Ctrl-C."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (reported in one line), imported lazily with the heavy modules."""
    from irra_dist.data.parsers import DatasetError, DatasetNotFoundError
    from irra_dist.data.shards import ShardError
    from irra_dist.distributed import TorchTooOldError
    from irra_dist.evaluation.metrics import RetrievalInputError
    from irra_dist.model import CheckpointError
    from irra_dist.optim import OptimSetupError

    return (ConfigError, CheckpointError, ShardError, DatasetError, DatasetNotFoundError, RetrievalInputError,
            OptimSetupError, TorchTooOldError)


def _is_first_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _report(message: str) -> None:
    from irra_dist.engine.failures import should_report

    if should_report():  # rank 0, or the rank whose failure stopped a multi-process run
        print(f"error: {message}", file=sys.stderr)
    _tell_launcher(f"error: {message}")
    if not should_report() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The launcher stops every process once one exits: let the reporting one print the line first.
        import time

        time.sleep(REPORT_GRACE_S)


def _tell_launcher(message: str) -> None:
    """Under ``accelerate launch`` (torch elastic), put the one line into this worker's error file, so that
    the launcher's failure summary shows it instead of "To enable traceback see ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import time

    try:
        atomic_write_text(path, json.dumps({"message": message, "timestamp": int(time.time())}))
    except OSError:
        pass  # the summary then falls back to its generic text; the line was printed already


def resume_command(run_dir: Path) -> str:
    """The command line that continues `run_dir` the way this training was started (``accelerate launch``
    with its options, ``python launch/train.py`` or ``irra-train``), for the message printed at Ctrl-C."""
    import shlex

    script = os.path.abspath(sys.argv[0])
    prefix = [sys.executable, script] if script.endswith(".py") else [script]
    launcher = _launcher_argv()
    if launcher:
        # e.g. [python, .../accelerate, launch, --config_file, X, launch/train.py, overrides...]
        for i, arg in enumerate(launcher):
            if os.path.abspath(arg) == script:
                start = 1 if launcher[0].rsplit("/", 1)[-1].startswith("python") else 0
                prefix = launcher[start:i + 1]
                break
    return shlex.join([*prefix, "--resume", str(run_dir)])


def _launcher_argv() -> list[str]:
    """The parent's command line when it is ``accelerate launch`` (Linux /proc), else []."""
    if "LOCAL_RANK" not in os.environ and "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return []
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    return argv if any(a.rsplit("/", 1)[-1] == "accelerate" for a in argv[:2]) else []


def _report_interrupt(run_dir: Path | None, checkpoint: Path | None) -> None:
    """One paragraph after Ctrl-C: where the run stands and the exact command that continues it."""
    if not _is_first_process():
        return
    if run_dir is None or checkpoint is None:
        where = f" (run folder {run_dir} removed)" if run_dir is not None and not run_dir.exists() else ""
        print(f"stopped by Ctrl-C before the first checkpoint: nothing to resume{where}", file=sys.stderr)
        return
    print(f"stopped by Ctrl-C; the last checkpoint is kept: {checkpoint}\n"
          f"continue with: {resume_command(run_dir)}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# irra-train


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irra-train",
        description="Train IRRA. Run it under `accelerate launch` for several GPUs or DeepSpeed "
                    "(see docs/TRAINING.md).")
    parser.add_argument("--config", default=None, metavar="PATH_OR_NAME",
                        help=f"recipe file or name in configs/ (default: {DEFAULT_RECIPE}; when resuming, "
                             "the run's own config.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.batch_size=32 optim.lr=2e-5")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="latest|PATH",
                        help="continue the latest run (under train.output_dir), or a run folder / checkpoint")
    parser.add_argument("--no-wandb", action="store_true", help="turn W&B logging off (logging.wandb=false)")
    return parser


def load_train_config(config: str | None, overrides: list[str], resume: str | None,
                      ) -> tuple[Config, Path | None]:
    """The run config: the recipe plus overrides, or, when resuming without --config, the run's config.yaml.

    Returns:
        ``(cfg, checkpoint folder or None)``.
    """
    from irra_dist.engine.checkpointing import resolve_checkpoint, run_dir_of
    from irra_dist.engine.trainer import resolve_resume
    from irra_dist.run_config import load_run_config

    if resume is None:
        return load_config(resolve_recipe(config or DEFAULT_RECIPE), overrides), None
    if config is not None:
        cfg = load_config(resolve_recipe(config), overrides)
        return cfg, resolve_resume(cfg, resume)
    if resume == "latest":
        probe = load_config(resolve_recipe(DEFAULT_RECIPE), overrides)
        checkpoint = resolve_resume(probe, "latest")
    else:
        checkpoint = resolve_checkpoint(resume)
    return load_run_config(run_dir_of(checkpoint), overrides), checkpoint


def train_main(argv: Sequence[str] | None = None) -> int:
    """``irra-train``: parse `argv`, train, return the exit status."""
    args = train_parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    resume = args.resume
    if resume is not None and "=" in resume and not Path(resume).exists():
        # `--resume key=value ...`: argparse gave the first override to --resume.
        overrides.insert(0, resume)
        resume = "latest"
    if args.no_wandb:
        overrides.append("logging.wandb=false")
    try:
        cfg, checkpoint = load_train_config(args.config, overrides, resume)
        from irra_dist.engine.trainer import NonFiniteLossError, TrainingInterrupted, train

        try:
            train(cfg, resume=checkpoint)
        except NonFiniteLossError as err:
            _report(str(err))
            return _leave(EXIT_DIVERGED)
        except TrainingInterrupted as stop:
            _report_interrupt(stop.run_dir, stop.checkpoint)
            return _leave(EXIT_INTERRUPTED)
    except _user_errors() as err:
        _report(str(err))
        return _leave(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        _report_interrupt(None, None)
        return _leave(EXIT_INTERRUPTED)
    except Exception as err:  # noqa: BLE001 - unexpected: a traceback, from one rank only
        from irra_dist.engine.failures import PeerFailure, launched_world, should_report

        if launched_world() < 2:
            raise
        if not isinstance(err, PeerFailure) and should_report():
            traceback.print_exc()
        return _leave(EXIT_DIVERGED)
    return 0


def _leave(code: int) -> int:
    """`code`; after a failure in a multi-process run, exit at once instead (see engine/failures.py)."""
    from irra_dist.engine.failures import exit_now, launched_world

    if launched_world() > 1:
        exit_now(code)
    return code


# --------------------------------------------------------------------------------------------------
# irra-eval


def image_size_arg(text: str) -> tuple[int, int]:
    """argparse ``type=`` of every ``HxW`` option: ``--image-size``, ``--thumb-size``, ``--pre-resize``."""
    try:
        return parse_image_size(text, "size")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irra-eval",
        description="Evaluate text-to-image retrieval of a run folder, a weights file (.safetensors) or an "
                    "official IRRA best.pth on a shard set. Runs under `accelerate launch` too.")
    parser.add_argument("target", help="run folder, checkpoint folder, weights file or official best.pth")
    parser.add_argument("--shards", nargs="+", default=None, metavar="DIR",
                        help="shard folder(s) (default: the run's data.shards); several give a cross-dataset "
                             "table with one row per set")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--weights", default="best", choices=("best", "last"),
                        help="for a run folder: best.safetensors (if any) or model.safetensors")
    parser.add_argument("--batch-size", type=int, default=256, help="items per batch and process")
    parser.add_argument("--num-workers", type=int, default=2, help="loader workers per process")
    parser.add_argument("--chunk-size", type=int, default=1024, help="queries scored at a time")
    parser.add_argument("--i2t", action="store_true", help="also report image-to-text retrieval")
    parser.add_argument("--image-size", type=image_size_arg, default=None, metavar="HxW",
                        help="input size for a file without metadata (official best.pth: 384x128)")
    parser.add_argument("--stride", type=int, default=None, help="patch stride for such a file (16)")
    parser.add_argument("--precision", default="auto", choices=("auto", "no", "fp16", "bf16"),
                        help="autocast while embedding (auto: the run's eval.precision; fp16 for an "
                             "official best.pth, as the official code evaluates)")
    parser.add_argument("--out", default=None, help="write the metrics as JSON to this file")
    parser.add_argument("--export-official", default=None, metavar="FILE",
                        help="instead of evaluating, write the weights as an official IRRA best.pth "
                             "({'model': state_dict}, official key names, fp32) for the official test.py")
    return parser


def _export_official(args: argparse.Namespace) -> int:
    from irra_dist.engine.evaluate import export_target

    try:
        source, note = export_target(args.target, args.export_official, weights=args.weights,
                               image_size=args.image_size,
                               stride_size=args.stride)
    except _user_errors() as err:
        _report(str(err))
        return EXIT_BAD_INPUT
    print(f"wrote {args.export_official} (official best.pth format) from {source}")
    if note:
        print(f"note: {note}")
    return 0


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``irra-eval``: parse `argv`, evaluate, print the table, maybe write JSON; return the exit status."""
    args = eval_parser().parse_args(argv)
    if args.export_official:
        return _export_official(args)
    try:
        from irra_dist.engine.evaluate import evaluate_on_sets

        results = evaluate_on_sets(
            args.target, args.shards, split=args.split, weights=args.weights,
            batch_size=args.batch_size, num_workers=args.num_workers, chunk_size=args.chunk_size,
            i2t=args.i2t, image_size=args.image_size,
            stride_size=args.stride, precision=args.precision)
    except _user_errors() as err:
        _report(str(err))
        return EXIT_BAD_INPUT
    if _is_first_process():
        from irra_dist.engine.evaluate import format_cross_table
        from irra_dist.evaluation.metrics import format_metrics_table

        for result in results:
            print(f"{result['target']} on {result['shards']} ({result['split']} split: "
                  f"{result['num_queries']} queries, {result['num_gallery']} images)")
            if len(results) == 1:
                print(format_metrics_table(result["metrics"]))
        if len(results) > 1:
            print(format_cross_table(results))
        if args.out:
            payload = results[0] if len(results) == 1 else results
            atomic_write_text(args.out, json.dumps(payload, indent=1) + "\n")
    return 0
