"""Failures across ranks: an exception on one rank ends every rank within seconds, reported once.

Without this, a rank that raises (bad data, an evaluation error, out of memory) leaves the others blocked
in their next collective until the process-group timeout (30 minutes), and every rank prints its own
secondary error. Here:

* The failing rank writes ``"<rank>\\t<message>"`` under one key of the launcher's rendezvous store (the
  TCPStore at ``MASTER_ADDR:MASTER_PORT`` that torchrun / ``accelerate launch`` keep in their agent) before
  anything else; the first rank to write it owns the failure (:func:`announce`).
* Every rank runs a daemon thread that polls that key every ``train.peer_failure_timeout_s`` seconds and
  ends its process (exit status 1, nothing printed) when another rank owns a failure, even while its main
  thread is blocked inside a collective (:class:`PeerFailureWatch`).
* A rank whose own exception comes after another rank's announcement (typically gloo's "connection closed
  by peer") raises :class:`PeerFailure` instead; the command line prints nothing for it.

So the original error is printed once, by the rank that owns it, and every process exits non-zero.
Checkpoints are unaffected: a save is renamed into place only when complete
(:mod:`irra_dist.engine.checkpointing`), so ``checkpoints/last`` stays the last good one.

Test-only: ``IRRA_DIST_INJECT_FAILURE="<rank>:<point>:<n>"`` makes rank ``<rank>`` raise
:class:`InjectedFailure` the ``<n>``-th time it reaches ``<point>`` (``train``: a training micro-step,
``eval``: an evaluation batch). It exists so that tests can fail one rank of a real launch; it costs one
comparison per step when unset.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
from types import TracebackType

import torch.distributed as dist

logger = logging.getLogger(__name__)

FAILURE_KEY = "irra_dist/first_failure"
INJECT_ENV = "IRRA_DIST_INJECT_FAILURE"
EXIT_PEER_FAILED = 1
_CONNECT_TIMEOUT = datetime.timedelta(seconds=10)


class PeerFailure(RuntimeError):
    """Another rank failed first; this rank's own error was a consequence (not reported again)."""


class InjectedFailure(RuntimeError):
    """The failure that ``IRRA_DIST_INJECT_FAILURE`` asked for (tests only)."""


# --------------------------------------------------------------------------------------------------
# The launcher's store


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def launched_world() -> int:
    """Number of processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _connect() -> dist.TCPStore | None:
    """A client of the launcher's store, or None when there is no launcher or it does not answer."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if launched_world() < 2 or not host or not port:
        return None
    try:
        return dist.TCPStore(host, int(port), is_master=False, timeout=_CONNECT_TIMEOUT,
                             wait_for_workers=False)
    except (RuntimeError, ValueError, OSError) as err:
        logger.debug("no rendezvous store to report failures through (%s)", err)
        return None


_owner: bool | None = None
"""Whether this process owns the run's failure (None: it announced none)."""


def announce(message: str) -> bool:
    """Record that this rank failed with `message`, unless another rank did first.

    Returns:
        True when this rank's failure is the first (it should be reported), False when another rank's is.
        Always True without a launcher or store.
    """
    global _owner
    store = _connect()
    if store is None:
        _owner = True
        return True
    mine = f"{_rank()}\t{message}"
    try:
        current = store.compare_set(FAILURE_KEY, "", mine)
    except (RuntimeError, OSError):
        _owner = True
        return True
    _owner = current.decode(errors="replace") == mine
    return _owner


def first_failure() -> tuple[int, str] | None:
    """The rank and message of the run's first failure, if one was announced and the store answers."""
    store = _connect()
    if store is None:
        return None
    try:
        if not store.check([FAILURE_KEY]):
            return None
        rank, _, message = store.get(FAILURE_KEY).decode(errors="replace").partition("\t")
        return int(rank), message
    except (RuntimeError, OSError, ValueError):
        return None


def should_report() -> bool:
    """Whether this process prints the run's error: the owner of an announced failure, else rank 0."""
    return _owner if _owner is not None else _rank() == 0


def exit_now(code: int) -> None:
    """Flush the logs and leave at once, skipping interpreter teardown (after a failure, process-group
    destructors and ZeRO-3's exit hooks can block or abort)."""
    for handler in logging.getLogger().handlers + logging.getLogger("irra_dist").handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001,S110 - leaving anyway
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --------------------------------------------------------------------------------------------------
# The watch


class PeerFailureWatch:
    """A context during which this process ends itself once another rank announces a failure.

    Args:
        poll_s: seconds between two looks at the store; every rank stops within about this time (plus the
            launcher's own teardown) after another one failed.
    """

    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeerFailureWatch:
        store = _connect()
        if store is not None:
            self._thread = threading.Thread(target=self._watch, args=(store,), name="irra-peer-failure",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            # Done polling before the caller tears the process group (and maybe the store) down.
            self._thread.join(timeout=self.poll_s + 10)

    def _watch(self, store: dist.TCPStore) -> None:
        me = str(_rank())
        while not self._stop.wait(self.poll_s):
            try:
                if not store.check([FAILURE_KEY]):
                    continue
                owner = store.get(FAILURE_KEY).decode(errors="replace").partition("\t")[0]
            except (RuntimeError, OSError):
                return  # the store is gone: the launcher is already tearing the run down
            if owner != me and not self._stop.is_set():
                logger.debug("rank %s failed: rank %s stops", owner, me)
                exit_now(EXIT_PEER_FAILED)


# --------------------------------------------------------------------------------------------------
# Test-only failure injection


def _parse_injection(spec: str | None) -> tuple[int, str, int] | None:
    if not spec:
        return None
    try:
        rank, point, count = spec.split(":")
        return int(rank), point, int(count)
    except ValueError:
        raise ValueError(f"{INJECT_ENV}={spec!r} is not <rank>:<train|eval>:<n>") from None


_injection = _parse_injection(os.environ.get(INJECT_ENV))
_reached: dict[str, int] = {}


def inject_failure(point: str) -> None:
    """Raise :class:`InjectedFailure` here if ``IRRA_DIST_INJECT_FAILURE`` names this rank and point."""
    if _injection is None:
        return
    rank, wanted, count = _injection
    if point != wanted or rank != _rank():
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == count:
        raise InjectedFailure(f"injected failure on rank {rank} at {point} #{count} ({INJECT_ENV})")
