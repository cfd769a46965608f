"""Every method says, before it runs, when its memory would not fit (``memory_reasons``), from an
estimate checked here against the memory a call really takes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from kdecli.masks import FULL, Causal
from kdecli.methods import get_method_class, make_method, method_names
from tests.conftest import make_qkv

N = 2**15
MEASURE = r"""
import json, os, sys, threading, time
import torch
from kdecli.methods import get_method_class, make_method

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

n, out = int(sys.argv[1]), {}
q, k, v = (torch.randn(1, 1, n, 64, generator=torch.Generator().manual_seed(i)) for i in range(3))
for name in sys.argv[2:]:
    method = make_method(name, 256 if get_method_class(name).uses_budget else None)
    base, peak, done = rss(), [0], [False]
    def poll():
        while not done[0]:
            peak[0] = max(peak[0], rss() - base)
            time.sleep(0.0002)
    thread = threading.Thread(target=poll)
    thread.start()
    with torch.no_grad():
        method(q, k, v, generator=torch.Generator().manual_seed(0))
    done[0] = True
    thread.join()
    out[name] = peak[0]
print(json.dumps(out))
"""


def modelled():
    return [  # h2o, snapkv have no forward to measure (decode steps over the prompt's queries)
        name
        for name in method_names()
        if not get_method_class(name).needs_prompt_queries
        and make_method(name, 256 if get_method_class(name).uses_budget else None).memory_bytes(
            1, 1, N, N, 64, 64, 4
        )
        is not None
    ]


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_estimates_cover_the_measured_peak_and_stay_close_to_it():
    """Measured in a child process whose allocator returns freed memory at once (a glibc mmap
    threshold of 64 KiB), so each call's RSS increase is its own, sampled every 0.2 ms."""

    def refused(name):  # rankk (max_n = 8192) and magicpig (max_pairs) refuse n = N by size
        method = make_method(name, 256 if get_method_class(name).uses_budget else None)
        return method.input_reasons(N, N, 64, 64, FULL)

    names = [name for name in modelled() if not refused(name)]
    assert len(names) >= 10, names
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    res = subprocess.run(
        [sys.executable, "-c", MEASURE, str(N), *names],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    measured = json.loads(res.stdout)
    for name in names:
        method = make_method(name, 256 if get_method_class(name).uses_budget else None)
        estimate = method.memory_bytes(1, 1, N, N, 64, 64, 4)
        assert estimate >= measured[name], (name, estimate, measured[name])
        # Close enough to mean something: within 8× (or 64 MiB) of what the call took.
        assert estimate <= 8 * measured[name] + 64 * 2**20, (name, estimate, measured[name])


@pytest.mark.parametrize("name", method_names())
def test_a_million_tokens_fit_in_this_machines_memory_or_are_refused_by_size(name):
    """ISSUE: n = 2^20, b·h = 1, d = 64, float32 — every method's estimate fits in 24 GiB, or
    the method refuses the size in its own reasons (the oracles' max_n) before it starts."""
    method = make_method(name, 256 if get_method_class(name).uses_budget else None)
    n = 2**20
    refused = method.input_reasons(n, n, 64, 64, FULL)
    if refused:
        pytest.skip(f"{name} refuses n = 2^20 by size: {'; '.join(refused)}")
    for mask in (FULL, Causal(0)):
        estimate = method.call_memory(1, 1, n, n, 64, 64, 4, mask)
        assert estimate is not None and estimate < 20 * 2**30, (name, mask, estimate)


def test_a_call_that_would_not_fit_is_refused_before_it_runs(monkeypatch):
    import kdecli.devices

    q, k, v = make_qkv(1, 2, 512, 512, 16)
    method = make_method("kdeformer", 64)
    assert method.not_supported_reasons(q, k, v) == []
    monkeypatch.setattr(kdecli.devices, "available_memory", lambda device: 1000)
    (reason,) = method.not_supported_reasons(q, k, v)
    assert "estimated memory" in reason and "GiB available on cpu" in reason
    monkeypatch.setattr(kdecli.devices, "available_memory", lambda device: None)
    assert method.not_supported_reasons(q, k, v) == []  # unknown: no refusal


def test_available_memory_is_positive_here():
    from kdecli.devices import available_memory

    free = available_memory(torch.device("cpu"))
    assert free is None or free > 0
