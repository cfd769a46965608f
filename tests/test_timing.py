"""Timings that hold: autorange, extrapolated exact time, sampled RSS on the CPU."""

import time

import pytest
import torch

import kdecli
from kdecli.experiments.compare import run as runner
from kdecli.experiments.compare.report import render_text
from kdecli.experiments.compare.run import RunConfig
from kdecli.measure.memory import rss_bytes, sampled_peak
from kdecli.measure.timing import MIN_SAMPLE_S, time_call


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


def test_autorange_with_a_real_sleep():
    t = time_call(lambda: time.sleep(0.01), "cpu", repeats=2, warmup=0, min_time=0.1)
    assert t.repeats >= 2 and sum(t.samples) >= 0.1
    assert 0.009 <= t.median < 0.05


def test_rss_sampling_sees_a_large_allocation_and_not_a_small_one():
    if rss_bytes() is None:
        pytest.skip("needs /proc/self/statm")
    _, big = sampled_peak(lambda: float(torch.ones(50_000_000).sum()))  # 200 MB of float32
    _, none = sampled_peak(lambda: None)
    assert big >= 150e6, big
    assert none < 20e6, none
    timed = time_call(lambda: torch.ones(50_000_000).sum(), "cpu", repeats=1, warmup=1)
    assert timed.memory_source == "rss" and timed.peak_memory_bytes >= 150e6


@pytest.fixture(scope="module")
def work():
    return kdecli.load_input("synthetic:n=4096,d=64").to("cpu", torch.float32)


def test_exact_time_is_extrapolated_above_the_limit_and_close_to_measured(work):
    config = RunConfig(repeats=3, causal=False)
    cpu = torch.device("cpu")
    full = runner._time_exact(work, 0.125, config, cpu)
    assert full.extrapolated_rows is None  # 4096² · 257 FLOPs: under the limit
    part = runner._time_exact(work, 0.125, config, cpu, limit_flops=0, rows=512)
    assert part.extrapolated_rows == 512 and part.peak_memory_bytes is None
    assert 0.5 < part.median / full.median < 2, (part.median, full.median)
    causal = RunConfig(repeats=3, causal=True)
    full_c = runner._time_exact(work, 0.125, causal, cpu)
    part_c = runner._time_exact(work, 0.125, causal, cpu, limit_flops=0, rows=512)
    assert 0.4 < part_c.median / full_c.median < 2.5, (part_c.median, full_c.median)


def test_compare_marks_an_extrapolated_exact_time(monkeypatch):
    monkeypatch.setattr(runner, "EXACT_TIMING_LIMIT_FLOPS", {"cpu": 0.0})
    monkeypatch.setattr(runner, "EXTRAPOLATION_ROWS", 16)
    qkv = kdecli.load_input("synthetic:n=97,d=21")
    report = kdecli.compare(qkv, ["uniform"], [16], device="cpu", repeats=2)
    exact = report.results[0].time.exact_s
    assert exact.extrapolated and exact.extrapolated_rows == 16
    assert report.as_dict()["results"][0]["time"]["exact_s"]["extrapolated"] is True
    text = render_text(report, "table", columns=("method", "exact_time", "speedup"))
    assert "≈" in text and "exact time extrapolated from 16 rows" in text
    monkeypatch.setattr(runner, "EXACT_TIMING_LIMIT_FLOPS", {"cpu": 1e30})
    measured = kdecli.compare(qkv, ["uniform"], [16], device="cpu", repeats=2)
    assert not measured.results[0].time.exact_s.extrapolated
    assert "≈" not in render_text(measured, "table")
