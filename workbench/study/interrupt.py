"""Ctrl-C and SIGTERM stop a study: the running trial ends FAILED, no new trial starts, the parent run
ends KILLED, and rerunning the command runs the rest.

Python raises KeyboardInterrupt wherever the main thread happens to be; inside a weakref callback or a
`__del__` (garbage collection runs after every trial) it is printed and swallowed. So the signal also sets
a flag, which the worker checks before each trial and the sweeper after its workers return.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from workbench.tracking import STOP_SIGNALS, Terminated

_requested = threading.Event()


def requested() -> bool:
    return _requested.is_set()


def check() -> None:
    """Raise KeyboardInterrupt if a stop was requested, even one whose exception was swallowed."""
    if _requested.is_set():
        raise KeyboardInterrupt("stop requested")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside, SIGINT raises KeyboardInterrupt and SIGTERM Terminated (a KeyboardInterrupt), and
    both set the flag. Only the main thread can install signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        _requested.set()
        raise Terminated(f"signal {signum}") if signum in STOP_SIGNALS else KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, *STOP_SIGNALS)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
