"""Exception types that the CLI maps to exit codes and one-line messages.

`UsageError` (exit 2) means the user asked for something that cannot be done as asked: a missing
file, a bad option, an unknown method.  `RuntimeFailure` (exit 1) means the request was fine but
running it failed.  Both carry a message meant for a person, and an optional hint with the fix.
"""

from __future__ import annotations

from collections.abc import Iterable
from difflib import get_close_matches


class KdecliError(Exception):
    """Base class: a message for a person, and an optional hint that says what to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(KdecliError):
    """The request itself is wrong (bad option, bad or missing input). Exit code 2."""

    exit_code = 2


class InputError(UsageError):
    """An input file or array cannot be used: it names the file, the array and the problem."""


class ParameterError(UsageError):
    """A method parameter or budget is out of range, of the wrong type, or unknown."""


class RuntimeFailure(KdecliError):
    """Running the request failed (out of memory, a write failed, a download broke). Exit code 1."""


def unknown_name(what: str, name: str, known: Iterable[str], hint: str) -> UsageError:
    """ "unknown method `kdeformr`. Did you mean `kdeformer`?": the closest known name, if any."""
    close = get_close_matches(name, list(known), n=1)
    suggestion = f" Did you mean `{close[0]}`?" if close else ""
    return UsageError(f"unknown {what} `{name}`.{suggestion}", hint=hint)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would raise KeyboardInterrupt: the run ends the same way."""


# How allocators say they ran out: torch.OutOfMemoryError (CUDA), MemoryError, and the CPU
# allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory: you tried to allocate …").
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory")


def first_line(exc: BaseException) -> str:
    """An exception's message, first line only (its type's name when it has none): what a record's
    ``reason`` and a one-line error keep of it."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OUT_OF_MEMORY)
