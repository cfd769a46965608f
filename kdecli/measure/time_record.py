"""What a record keeps of its timings: ``TimeStat`` figures, the speed-ups, and why one is missing.

A decode step's record (``decode_time``) holds the step as the method's time, the cache's
preparation apart, and the step amortised over the stated number of steps with its speed-up.

A method's time and exact attention's come from the same process, device, dtype and thread count,
so their ratio (``speedup`` = exact / method) is a like-for-like comparison; with ``--backward``
the forward + backward figures and their ratio are added beside them.  A timing that failed
leaves its figure out and says why in the record's ``note`` (forward) or ``backward_note``.
"""

from __future__ import annotations

from dataclasses import replace

from kdecli.measure.failures import Failure
from kdecli.measure.figures import ResultTime, TimeStat
from kdecli.measure.timed import DecodeTiming
from kdecli.measure.timing import Timing


def time_stat(timing: Timing) -> TimeStat:
    """The record of a ``Timing``: what JSON keeps of it."""
    return TimeStat(
        timing.median,
        timing.iqr,
        timing.repeats,
        timing.peak_memory_bytes,
        calls_per_sample=timing.calls_per_sample,
        memory_source=timing.memory_source,
        min_time=timing.min_time,
        extrapolated=timing.extrapolated_rows is not None,
        extrapolated_rows=timing.extrapolated_rows,
    )


def result_time(method: Timing | Failure, exact: Timing | Failure | None) -> ResultTime:
    """The forward figures: the method's time, exact attention's and the speed-up."""
    if isinstance(method, Failure):
        return ResultTime(None, None, None, note=method.reason)
    if isinstance(exact, Failure):
        return ResultTime(time_stat(method), None, None, note=exact.reason)
    if exact is None:
        return ResultTime(time_stat(method), None, None)
    return ResultTime(time_stat(method), time_stat(exact), exact.median / method.median)


def decode_time(decode: DecodeTiming | Failure, exact: Timing | Failure | None) -> ResultTime:
    """A decode step's figures: the step against exact attention's step (``method_s``,
    ``exact_s``, ``speedup``), the preparation (``prepare_s``, absent when the method has none),
    ``steps`` and the amortised step, step + prepare/steps, with its speed-up."""
    if isinstance(decode, Failure):
        return ResultTime(None, None, None, note=decode.reason)
    time = result_time(decode.step, exact)
    amortised = decode.amortised
    speedup = None
    if isinstance(exact, Timing) and amortised > 0:
        speedup = exact.median / amortised
    return replace(
        time,
        prepare_s=None if decode.prepare is None else time_stat(decode.prepare),
        steps=decode.steps,
        amortised_s=amortised,
        amortised_speedup=speedup,
    )


def with_backward(
    time: ResultTime, backward: Timing | Failure, exact: Timing | Failure | None
) -> ResultTime:
    """``time`` with the forward + backward figures (or why they are missing) added."""
    notes = []
    backward_s = exact_s = speedup = None
    if isinstance(backward, Failure):
        notes.append(backward.reason)
    else:
        backward_s = time_stat(backward)
    if isinstance(exact, Failure):
        notes.append(exact.reason)
    elif exact is not None:
        exact_s = time_stat(exact)
        if backward_s is not None and backward.median > 0:
            speedup = exact.median / backward.median
    return replace(
        time,
        backward_s=backward_s,
        exact_backward_s=exact_s,
        backward_speedup=speedup,
        backward_note="; ".join(notes) or None,
    )
