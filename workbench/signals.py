"""Stop signals, one mechanism for the trainer, the study workers and the study sweeper.

Ctrl-C (SIGINT) raises KeyboardInterrupt; a scheduler's SIGTERM and SLURM's SIGUSR2 warning before the
time limit raise `Terminated`, a KeyboardInterrupt, so everything ends the way Ctrl-C ends it (runs KILLED,
trials handed back). Each stop is also recorded, for two reasons: callers report which signal it was
(exit status 128 + signal), and Python swallows a KeyboardInterrupt raised inside a weakref callback or a
`__del__` (garbage collection runs them at any moment), so `check()` raises the stop again where it is safe
(between batches, between trials).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

# What a scheduler sends before it stops a job: SIGTERM, and SIGUSR2 from SLURM (submitit's --signal).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
SIGNALS = (signal.SIGINT, *STOP_SIGNALS)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop or preemption) or SLURM's SIGUSR2 warning before the time limit ends a
    run the way Ctrl-C does: KILLED."""


_received: signal.Signals | None = None  # the first stop signal of the outermost scope
_early: signal.Signals | None = None  # a stop that came before it (record_early_stops)
_depth = 0  # scopes entered on the main thread; only the outermost installs handlers
_defer = False  # the outermost scope only records (its workers, other processes, stop themselves)
_raised = False  # a stop is being handled: further signals must not interrupt its clean-up
_holding = 0  # inside held(): a stop waits until the write in progress is done
_pending = False  # a stop arrived while held


def received() -> signal.Signals | None:
    """The stop signal that arrived in the current (or last) scope, or before it, if any."""
    return _received


def exit_status() -> int:
    """128 + the signal, as a shell reports a process a signal ended: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + int(_received or signal.SIGINT)


def check() -> None:
    """Raise the recorded stop again, even one whose first exception Python swallowed."""
    if _received is not None:
        raise _exception(_received)


def _exception(signum: signal.Signals) -> KeyboardInterrupt:
    return Terminated(f"signal {int(signum)}") if signum in STOP_SIGNALS else KeyboardInterrupt()


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A write that must not be cut in half (a checkpoint, an epoch's metrics, a report to the study): a
    stop signal that arrives meanwhile is raised when it is done. A KeyboardInterrupt inside a database
    write could leave the store's connection unusable, and the run could then not be ended KILLED."""
    global _holding, _pending, _raised
    _holding += 1
    try:
        yield
    finally:
        _holding -= 1
    if not _holding and _pending:
        _pending, _raised = False, True
        raise _exception(_received or signal.SIGINT)


def record_early_stops() -> None:
    """In a submitit job (SLURM or local), from before the work starts: a scheduler's SIGTERM or SLURM's
    SIGUSR2 that comes before the first scope is recorded, and that scope starts stopped (a study worker
    takes no trial). submitit's own handlers would ignore SIGTERM, and answer SIGUSR2 near the time limit
    by failing the job, which fails the sweep. Left in place after the work: a late signal is ignored."""
    if threading.current_thread() is threading.main_thread() and not _depth:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _record_early)


def _record_early(signum: int, frame: object) -> None:
    global _early
    _early = _early or signal.Signals(signum)


@contextlib.contextmanager
def stop_on_signals(defer: bool = False) -> Iterator[None]:
    """While inside, a stop signal is recorded and raised as above; on exit the previous handlers return.

    Nested scopes share the outermost one's handlers and behaviour. Once a stop has been raised, further
    signals are ignored while it is handled (unless Python swallowed it). `defer=True` (the outermost scope only)
    records without raising, once: a launching process whose workers (other processes of its process group)
    got the same signal waits for them to hand back their trials, then `check()` raises; a second signal
    raises at once. Only the main thread can install handlers; elsewhere this does nothing."""
    global _depth, _defer, _early, _raised, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    _received, _early, _defer, _raised = _early, None, defer, False
    previous = {sig: signal.signal(sig, _handler) for sig in SIGNALS}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable(previous_hook)
    _depth = 1
    try:
        yield
    finally:
        _depth = 0
        sys.unraisablehook = previous_hook
        for sig, old in previous.items():
            signal.signal(sig, old)


def _handler(signum: int, frame: object) -> None:
    global _pending, _raised, _received
    first = _received is None
    if first:
        _received = signal.Signals(signum)
    if _holding and not _raised and not _defer:
        _pending = True
        return
    if first and _defer:
        print(
            f"Stopping ({signal.Signals(signum).name}): waiting for the workers to hand back their trials; "
            "press Ctrl-C again to stop at once",
            file=sys.stderr,
        )
        return
    if _raised and not _defer:
        # The stop is being handled (a run ending KILLED, a trial handed back): a second Ctrl-C, or the
        # SIGINT a launcher forwards to a job that already got the process group's, must not cut it short.
        return
    _raised = True
    raise _exception(signal.Signals(signum))


def _unraisable(previous: Any) -> Any:
    """Python prints a KeyboardInterrupt it had to swallow ("Exception ignored in ..."): the stop is recorded
    and raised again by `check()`, so say nothing."""

    def hook(unraisable: Any) -> None:
        global _raised
        if _received is not None and isinstance(unraisable.exc_value, KeyboardInterrupt):
            _raised = False  # nothing is handling it: the next signal raises again
            return
        previous(unraisable)

    return hook
