"""Peak memory of a call on the CPU: the process's resident set size, sampled in a thread; and
the estimate of what a decode measurement holds, checked before it starts (``decode_bytes``).

The figure is the *sampled RSS increase*: max over samples of RSS, minus RSS just before the call.
A thread reads ``/proc/self/statm`` about every millisecond while the call runs (torch releases
the GIL in its kernels, so the thread keeps sampling).  It is a lower bound of the call's peak:
a peak shorter than the interval can fall between two samples, and memory the allocator kept from
earlier calls is reused without raising RSS.  To shrink the latter, glibc's ``malloc_trim(0)``
hands free heap memory back to the OS before the baseline is read.  Without ``/proc`` (macOS)
there is no figure (None): ``ru_maxrss`` is a lifetime peak that cannot be reset per call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from typing import TypeVar

STATM = "/proc/self/statm"
INTERVAL_S = 0.001
T = TypeVar("T")


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 4096


PAGE = _page_size()


def rss_bytes() -> int | None:
    """The resident set size now (statm's second field, in pages), or None without /proc."""
    try:
        with open(STATM, "rb") as statm:
            return int(statm.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return None


def _trim_heap() -> None:
    """glibc only: return freed heap pages to the OS, so that the baseline is not inflated by
    memory an earlier call freed but the allocator kept (and this call would reuse unseen)."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


class RssSampler:
    """``with RssSampler() as s: fn()`` then ``s.peak_increase``: bytes, or None without /proc."""

    def __init__(self, interval: float = INTERVAL_S):
        self.interval = interval
        self.base: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        _trim_heap()
        self.base = self.peak = rss_bytes()
        if self.base is not None:
            self._thread = threading.Thread(target=self._run, name="kdecli-rss", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._see(rss_bytes())

    def _see(self, value: int | None) -> None:
        if value is not None and self.peak is not None:
            self.peak = max(self.peak, value)

    def __exit__(self, *exc: object) -> None:
        self._see(rss_bytes())  # the end of the call, in case it ended between samples
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._see(rss_bytes())

    @property
    def peak_increase(self) -> int | None:
        if self.base is None or self.peak is None:
            return None
        return max(0, self.peak - self.base)


def decode_bytes(
    b: int, h: int, n_k: int, d: int, d_v: int, queries: int, itemsize: int, work_itemsize: int
) -> int:
    """Bytes a decode measurement over a cache of n_k keys holds beside the methods' own calls
    (which their ``call_memory`` estimates): the input as loaded (Q, K, V of n_k rows, ``itemsize``
    bytes), the measured rows and the cache in float64 for the reference, and in the working
    dtype (``work_itemsize``).  The cache dominates: n_k·(d + d_v) numbers per slice each time."""
    slices = b * h
    loaded = n_k * (2 * d + d_v) * itemsize
    cache = n_k * (d + d_v) + queries * (d + d_v)
    return slices * (loaded + cache * (8 + work_itemsize))


def sampled_peak(fn: Callable[[], T]) -> tuple[T, int | None]:
    """``fn()`` and its sampled RSS increase in bytes (None where RSS cannot be read)."""
    with RssSampler() as sampler:
        value = fn()
    return value, sampler.peak_increase
