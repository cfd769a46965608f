"""Why a call gave no result: one classifier for every experiment.

A record that could not be measured says so with a ``status`` and a one-line ``reason``:

- ``unsupported``: the method refused this input or these parameters (it raised a
  ``UsageError``: a ``ParameterError`` for a budget it cannot take at n_k keys, a shape or mask it
  cannot honour), or declared it could not run (its ``not_supported_reasons``);
- ``oom``: an allocator ran out of memory (``kdecli.errors.is_out_of_memory``: CUDA's
  ``OutOfMemoryError``, ``MemoryError``, the CPU allocator's "can't allocate memory");
- ``error``: anything else the call raised (a bug, a crashed worker), with its type's name.

``Failure.of(exc, what)`` names the stage that failed (``timing``, ``backward``, ``ray task``)
in the reason; without ``what`` the failure is the measured call's own.  Wrapped exceptions (a
Ray ``RayTaskError`` carries the worker's as ``cause``) are read through: the innermost one is
named, and running out of memory anywhere in the chain is ``oom``.  ``refusals=False`` where a
``UsageError`` cannot be a method's refusal (it was raised around the method, as a Ray task's
plan): it is then an ``error`` like any other exception.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdecli.errors import UsageError, first_line, is_out_of_memory

STATUSES = ("ok", "unsupported", "oom", "error")


@dataclass(frozen=True)
class Failure:
    """A call that gave no result: ``status`` (unsupported, oom or error) and why, in one line."""

    status: str
    reason: str

    @classmethod
    def of(cls, exc: BaseException, what: str | None = None, *, refusals: bool = True) -> Failure:
        """Classify ``exc`` (see the module docstring); ``what`` names the failed stage."""
        chain = _chain(exc)
        shown = chain[-1]
        if refusals and isinstance(shown, UsageError):
            return cls("unsupported", _stage(what, "not supported", first_line(shown)))
        if any(is_out_of_memory(e) for e in chain):
            return cls("oom", _stage(what, "ran out of memory", first_line(shown)))
        message = f"{type(shown).__name__}: {first_line(shown)}"
        return cls("error", _stage(what, "failed", message))

    @classmethod
    def unsupported(cls, reasons: list[str], what: str | None = None) -> Failure:
        """A method's own ``not_supported_reasons``, joined."""
        return cls("unsupported", _stage(what, "not supported", "; ".join(reasons)))


def _stage(what: str | None, verb: str, message: str) -> str:
    """``message``, or ``{what} {verb}: {message}`` when a stage is named."""
    return message if what is None else f"{what} {verb}: {message}"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it wraps as ``cause`` (Ray's task errors), outermost first."""
    chain = [exc]
    while len(chain) < 8:
        cause = getattr(chain[-1], "cause", None)
        if not isinstance(cause, BaseException) or cause is chain[-1]:
            break
        chain.append(cause)
    return chain
