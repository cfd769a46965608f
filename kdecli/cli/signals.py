"""Ctrl-C and SIGTERM end a run the same way: stop between records and keep what finished.

Outside a run (start-up, loading, writing), both raise: ``KeyboardInterrupt`` for SIGINT and
``kdecli.errors.Terminated`` (a ``KeyboardInterrupt``) for SIGTERM, which the command's error
handler turns into one line and exit 130 or 143.  While Typer parses the command line, before
that handler runs, they raise ``SignalAtStartUp`` instead, which Typer lets through to the entry
point (``guard_start_up``, ``command_started``).  Inside ``graceful_stop`` the first signal only
asks the run to stop after the record it is computing; a second one raises as above.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kdecli.errors import Terminated

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _raise(signum: int, frame) -> None:
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


class SignalAtStartUp(BaseException):
    """SIGINT or SIGTERM after the imports and before a command's own handler: while Typer
    parses the command line.  Not a ``KeyboardInterrupt``, which Typer would turn into a silent
    exit 130 (for SIGTERM too); ``kdecli.cli.main`` turns it into one line and 130 or 143."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _at_start_up(signum: int, frame) -> None:
    raise SignalAtStartUp(signum)


def guard_start_up() -> None:
    """Until ``command_started``, SIGINT and SIGTERM raise ``SignalAtStartUp`` (the entry point
    calls it once the command line's modules are imported)."""
    for sig in EXIT_CODES:
        signal.signal(sig, _at_start_up)


def command_started() -> None:
    """A command's error handler is running: signals raise ``KeyboardInterrupt`` and
    ``Terminated`` again.  Only where ``guard_start_up`` installed its handler (not in a process
    that calls the application in-process, such as a test's)."""
    if threading.current_thread() is not threading.main_thread():
        return
    normal = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise}
    for sig, handler in normal.items():
        if signal.getsignal(sig) is _at_start_up:
            signal.signal(sig, handler)


@dataclass
class StopRequest:
    """Set by the first signal inside ``graceful_stop``; the runner polls ``requested``."""

    signum: int | None = None

    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)


@contextmanager
def graceful_stop(announce: Callable[[str], None]) -> Iterator[StopRequest]:
    """Within the block, the first SIGINT or SIGTERM sets the request (and says so once)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signals reach only the main thread: nothing to install
        return

    def first(signum: int, frame) -> None:
        if request.requested():
            _raise(signum, frame)
        request.signum = signum
        announce("Stopping after the current record (signal again to stop at once).")

    previous = {sig: signal.signal(sig, first) for sig in EXIT_CODES}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
