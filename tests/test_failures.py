"""One failure classifier for every experiment: status and a one-line reason."""

import pytest

from kdecli.errors import ParameterError, RuntimeFailure, UsageError
from kdecli.measure.failures import Failure


class Wrapped(Exception):
    """As Ray's task errors carry the worker's exception: ``cause``."""

    def __init__(self, cause):
        super().__init__(f"task failed\n{cause}")
        self.cause = cause


@pytest.mark.parametrize(
    "exc, what, status, reason",
    [
        (ParameterError("kdeformer: `samples` must be >= 1; got 0."), None, "unsupported",
         "kdeformer: `samples` must be >= 1; got 0."),
        (UsageError("no causal mode"), "backward", "unsupported",
         "backward not supported: no causal mode"),
        (MemoryError(), None, "oom", "MemoryError"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried\nmore"), "timing",
         "oom", "timing ran out of memory: DefaultCPUAllocator: can't allocate memory: you tried"),
        (RuntimeError("kaboom\nsecond line"), None, "error", "RuntimeError: kaboom"),
        (RuntimeFailure("write failed"), "timing exact attention", "error",
         "timing exact attention failed: RuntimeFailure: write failed"),
    ],
)  # fmt: skip
def test_status_and_one_line_reason(exc, what, status, reason):
    assert Failure.of(exc, what) == Failure(status, reason)


def test_a_wrapped_exception_is_named_and_its_memory_seen():
    inner = UsageError("unknown method `ghost`.")
    failure = Failure.of(Wrapped(inner), "ray task", refusals=False)
    assert failure == Failure("error", "ray task failed: UsageError: unknown method `ghost`.")
    assert Failure.of(Wrapped(inner), "ray task").status == "unsupported"
    oom = Failure.of(Wrapped(RuntimeError("CUDA out of memory. Tried")), "ray task")
    assert oom == Failure("oom", "ray task ran out of memory: CUDA out of memory. Tried")


def test_declared_reasons_are_joined():
    assert Failure.unsupported(["a", "b"]) == Failure("unsupported", "a; b")
    assert Failure.unsupported(["a"], "backward").reason == "backward not supported: a"
