"""Timings that hold: autorange, extrapolated exact time, sampled RSS on the CPU."""

import time

import pytest
import torch

import kdecli
from kdecli.experiments.compare.report import render_text
from kdecli.masks import FULL, Causal
from kdecli.measure import timed
from kdecli.measure.memory import rss_bytes, sampled_peak
from kdecli.measure.timed import TimingOptions
from kdecli.measure.timing import MIN_SAMPLE_S, time_call
from kdecli.methods.exact import Exact
from kdecli.qkv import QKV


class FakeClock:
    """A clock that moves only when the timed function runs: ``step`` seconds a call."""

    def __init__(self, step):
        self.now, self.step, self.calls = 0.0, step, 0

    def __call__(self):
        return self.now

    def fn(self):
        self.now += self.step
        self.calls += 1


def test_autorange_reaches_min_time_and_repeats():
    clock = FakeClock(0.1)
    t = time_call(clock.fn, "cpu", repeats=3, warmup=1, min_time=1.0, clock=clock)
    assert sum(t.samples) >= 1.0 - 1e-9 and t.repeats == len(t.samples) >= 10
    assert t.median == pytest.approx(0.1) and t.calls_per_sample == 1 and t.min_time == 1.0
    slow = FakeClock(0.5)  # min_time is reached at once: repeats decides
    assert time_call(slow.fn, "cpu", repeats=4, warmup=0, min_time=0.2, clock=slow).repeats == 4


def test_min_time_zero_is_exactly_repeats_calls():
    clock = FakeClock(1e-6)
    t = time_call(clock.fn, "cpu", repeats=3, warmup=2, min_time=0.0, clock=clock)
    assert t.repeats == 3 and clock.calls == 5 and t.calls_per_sample == 1


def test_fast_calls_are_timed_in_blocks_above_the_resolution():
    clock = FakeClock(1e-6)
    t = time_call(clock.fn, "cpu", repeats=3, warmup=0, min_time=0.01, clock=clock)
    assert t.calls_per_sample * 1e-6 >= MIN_SAMPLE_S * 0.99
    assert t.median == pytest.approx(1e-6) and sum(t.samples) * t.calls_per_sample >= 0.01 - 1e-9


def test_autorange_with_the_real_clock_keeps_its_invariants():
    """Whatever the machine's load: at least ``repeats`` samples whose sum reaches ``min_time``
    (the loop's own condition), single calls for a call slower than ``MIN_SAMPLE_S``.  How long a
    sleep takes is not asserted: that is the machine's business."""
    t = time_call(lambda: time.sleep(0.002), "cpu", repeats=2, warmup=0, min_time=0.02)
    assert t.repeats == len(t.samples) >= 2 and sum(t.samples) >= 0.02
    assert t.calls_per_sample == 1 and min(t.samples) <= t.median <= max(t.samples)


def test_rss_sampling_sees_a_large_allocation_and_not_a_small_one():
    if rss_bytes() is None:
        pytest.skip("needs /proc/self/statm")
    _, big = sampled_peak(lambda: float(torch.ones(50_000_000).sum()))  # 200 MB of float32
    _, none = sampled_peak(lambda: None)
    assert big >= 150e6, big
    assert none < 20e6, none
    timed = time_call(lambda: torch.ones(50_000_000).sum(), "cpu", repeats=1, warmup=1)
    assert timed.memory_source == "rss" and timed.peak_memory_bytes >= 150e6


class RowClock:
    """A clock moved by a stand-in for exact attention: ``per_pair`` seconds per (query, key)
    pair its mask lets it compute, so its time is exactly linear in the rows it is given."""

    def __init__(self, per_pair=1e-9):
        self.now, self.per_pair, self.calls = 0.0, per_pair, []

    def __call__(self):
        return self.now

    def exact(self):
        clock = self

        class Counted(Exact):
            def __call__(self, q, k, v, *, scale=None, generator=None, mask=FULL):
                n_q, n_k = q.shape[-2], k.shape[-2]
                clock.calls.append((n_q, mask))
                clock.now += clock.per_pair * float(mask.visible_keys(n_q, n_k).sum())
                return torch.zeros(*q.shape[:-1], v.shape[-1])

        return Counted


@pytest.fixture
def row_clock(monkeypatch):
    clock = RowClock()
    monkeypatch.setattr(timed, "method_of_role", lambda role: clock.exact())
    return clock


@pytest.mark.parametrize("mask", [FULL, Causal(0), Causal(40)], ids=str)
def test_exact_time_past_the_limit_is_extrapolated_from_rows_to_the_measured_time(row_clock, mask):
    """A call whose time is linear in its rows: the extrapolation from 32 rows gives the time of
    the whole call — for a causal mask too, where the 32 rows run unmasked and are scaled by the
    share of pairs the mask allows."""
    n_q = 160 if mask == FULL or mask.offset == 0 else 120
    work = QKV(*(torch.zeros(1, 1, n, 8) for n in (n_q, 160, 160)), "zeros")
    options = TimingOptions(repeats=3, warmup=0, clock=row_clock)
    full = timed.time_exact(work, 0.125, mask, options)
    assert full.extrapolated_rows is None  # far under the limit: timed in full
    assert row_clock.calls[-1] == (n_q, mask)
    part = timed.time_exact(work, 0.125, mask, options, limit_flops=0, rows=32)
    assert row_clock.calls[-1] == (32, FULL)  # the first rows, against every key, unmasked
    assert part.extrapolated_rows == 32 and part.peak_memory_bytes is None
    assert part.median == pytest.approx(full.median, rel=1e-12)
    assert len(row_clock.calls) == 2 * (timed.EXACT_WARMUP + 3)  # exact gets its warm-ups


def test_the_share_of_pairs_a_mask_allows():
    assert timed.allowed_share(FULL, 7, 9) == 1.0
    assert timed.allowed_share(Causal(0), 4096, 4096) == (4096 + 1) / (2 * 4096)
    assert timed.allowed_share(Causal(3), 2, 5) == (4 + 5) / 10


@pytest.fixture(scope="module")
def work():
    return kdecli.load_input("synthetic:n=4096,d=64").to("cpu", torch.float32)


def test_exact_time_is_extrapolated_above_the_limit(work):
    """The real SDPA, extrapolated: the record's structure (its figures are compared in
    benchmarks/bench_timing.py, where a time may be compared)."""
    options = TimingOptions(repeats=1, warmup=0)
    full = timed.time_exact(work, 0.125, FULL, options)
    assert full.extrapolated_rows is None  # 4096² · 257 FLOPs: under the limit
    part = timed.time_exact(work, 0.125, Causal(0), options, limit_flops=0, rows=512)
    assert part.extrapolated_rows == 512 and part.peak_memory_bytes is None and part.median > 0


def test_compare_marks_an_extrapolated_exact_time(monkeypatch):
    monkeypatch.setattr(timed, "EXACT_TIMING_LIMIT_FLOPS", {"cpu": 0.0})
    monkeypatch.setattr(timed, "EXTRAPOLATION_ROWS", 16)
    qkv = kdecli.load_input("synthetic:n=97,d=21")
    report = kdecli.compare(qkv, ["uniform"], [16], device="cpu", repeats=2)
    exact = report.results[0].time.exact_s
    assert exact.extrapolated and exact.extrapolated_rows == 16
    assert report.as_dict()["results"][0]["time"]["exact_s"]["extrapolated"] is True
    text = render_text(report, "table", columns=("method", "exact_time", "speedup"))
    assert "≈" in text and "exact time extrapolated from 16 rows" in text
    monkeypatch.setattr(timed, "EXACT_TIMING_LIMIT_FLOPS", {"cpu": 1e30})
    measured = kdecli.compare(qkv, ["uniform"], [16], device="cpu", repeats=2)
    assert not measured.results[0].time.exact_s.extrapolated
    assert "≈" not in render_text(measured, "table")
