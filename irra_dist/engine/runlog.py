"""The run folder's names and one logging setup: console and ``train_log.txt`` on the main process.

Every irra_dist module logs through ``logging.getLogger(__name__)``; the handlers are attached once, to the
package logger ``irra_dist``, so library messages (data, model, metrics) reach the run's log file too.
The format is the official one (IRRA_SPEC 4.4): ``"%(asctime)s %(name)s %(levelname)s: %(message)s"``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from irra_dist.fileio import atomic_write_text
from irra_dist.model.weights import BEST_WEIGHTS_FILE, CONFIG_FILE, WEIGHTS_FILE  # noqa: F401 (re-exported)

# The run folder's files (docs/TRAINING.md); the weights files are named where they are read.
LOG_FILE = "train_log.txt"
METRICS_FILE = "metrics.jsonl"

PACKAGE_LOGGER = "irra_dist"
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


class _PendingRecords(logging.Handler):
    """Keeps the records logged before the log file exists (a bounded number)."""

    def __init__(self, capacity: int = 2000) -> None:
        super().__init__()
        self.capacity = capacity
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.capacity:
            self.records.append(record)


class RunLogging:
    """The handlers of one run on the ``irra_dist`` logger; :meth:`add_file` attaches the log file later."""

    def __init__(self, is_main: bool, rank: int) -> None:
        self.logger = logging.getLogger(PACKAGE_LOGGER)
        self.is_main = is_main
        self.handlers: list[logging.Handler] = []
        self.pending: _PendingRecords | None = None
        if is_main:
            self._attach(logging.StreamHandler(sys.stdout), LOG_FORMAT, logging.INFO)
            # Lines logged before the run folder exists go into its log file once it does.
            self.pending = _PendingRecords()
            self._attach(self.pending, LOG_FORMAT, logging.INFO)
        else:
            # Other ranks stay quiet unless something goes wrong on them.
            self._attach(logging.StreamHandler(sys.stderr), f"[rank {rank}] {LOG_FORMAT}", logging.WARNING)

    def _attach(self, handler: logging.Handler, fmt: str, level: int) -> None:
        handler.setFormatter(logging.Formatter(fmt))
        handler.setLevel(level)
        self.logger.addHandler(handler)
        self.handlers.append(handler)

    def add_file(self, path: Path) -> None:
        """Append the main process's messages to `path` too (a resumed run continues the same file)."""
        if self.is_main:
            file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
            self._attach(file_handler, LOG_FORMAT, logging.INFO)
            if self.pending is not None:
                self.logger.removeHandler(self.pending)
                self.handlers.remove(self.pending)
                for record in self.pending.records:
                    file_handler.handle(record)
                self.pending = None

    def close(self) -> None:
        for handler in self.handlers:
            self.logger.removeHandler(handler)
            handler.close()
        self.handlers.clear()


@contextmanager
def run_logging(*, is_main: bool, rank: int) -> Iterator[RunLogging]:
    """Attach the run's handlers to the ``irra_dist`` logger for the duration of the block.

    Args:
        is_main: whether this is the main process (console at INFO, and the log file once added).
        rank: this process's index, shown in the warnings of the other ranks.

    Yields:
        The :class:`RunLogging`, to add the log file once the run folder exists.
    """
    logs = RunLogging(is_main, rank)
    old_level = logs.logger.level
    logs.logger.setLevel(logging.INFO if is_main else logging.WARNING)
    try:
        yield logs
    finally:
        logs.close()
        logs.logger.setLevel(old_level)


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process only; a no-op elsewhere)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, row: Mapping[str, Any]) -> None:
        """Append `row` and close the file, so a killed run keeps every row written before it died."""
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after optimizer step `step` (by a run that died after its last checkpoint), so
        that the resumed run continues one curve."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file; a torn last line (a run killed mid-write) is ignored."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
