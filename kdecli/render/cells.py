"""How numbers read in every table and figure: times, FLOPs, parameters, optional figures.

One spelling per quantity across compare, scale and drift: a time in µs, ms or s with three
significant figures' worth of digits, a FLOPs count with an SI prefix, an absent value as ``—``.
"""

from __future__ import annotations

from typing import Any

MISSING = "—"


def fmt_time(seconds: float | None) -> str:
    """``153 µs``, ``7.8 ms``, ``1.25 s``; ``—`` when there is none."""
    if seconds is None:
        return MISSING
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_flops(flops: float | None) -> str:
    """``2.13 M``: three significant figures and an SI prefix."""
    if flops is None:
        return MISSING
    for factor, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if flops >= factor:
            return f"{flops / factor:.3g} {unit}"
    return f"{flops:.3g}"


def fmt_params(params: dict[str, Any]) -> str:
    """``block_size=4 samples=8``, or ``—``."""
    return " ".join(f"{k}={v}" for k, v in params.items()) or MISSING


def fmt_number(value: float | None, spec: str = ".3g") -> str:
    return MISSING if value is None else format(value, spec)


def fmt_speedup(speedup: float | None, spec: str = ".1f") -> str:
    """``14.1×``, and below 1 two significant digits (``0.034×``, never ``0.0×``); ``—`` when
    not timed (or zero)."""
    if not speedup:
        return MISSING
    return f"{speedup:{spec}}×" if speedup >= 1 else f"{speedup:.2g}×"
