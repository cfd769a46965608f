"""benchmarks/bench_blocksparse.py's own arithmetic: the shares it reads from key sets, the
interleaved rounds and the speed-up against SDPA (tiny inputs, a fake clock; the figures
themselves come from running the script)."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch

from kdecli.masks import Causal
from kdecli.methods import make_method

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_blocksparse.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_blocksparse", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _qkv(n: int = 97, d: int = 16, h: int = 2):
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(1, h, n, d, generator=g) for _ in range(3))


def test_realised_density_is_the_share_of_the_causal_logits(bench):
    """Σ_i |S_i| / Σ_i (i + 1) from the keys per query: every key is 1, a window of w keys
    (min(w, i + 1) per query) its own share, counted from the key sets."""
    q, k, v = _qkv()
    n, mask = q.shape[-2], Causal(0)
    assert bench.realised_density((n + 1) / 2, mask, n) == pytest.approx(1.0)
    method = make_method("streaming", 16, budget_mode="keys")
    kept = method.key_sets(q, k, v, 0.25, None, mask).rows(0, n).sum(-1).double()
    share = float(kept[0, 0].sum() / torch.arange(1, n + 1).sum())
    read = bench.keys_read(method, q, k, v, 0.25, mask)
    assert bench.realised_density(read, mask, n) == pytest.approx(share, rel=1e-6)
    assert bench.realised_density(None, mask, n) is None


def test_a_tile_method_is_counted_on_the_call(bench):
    """blocktopk's keys are counted from its own choice: its density is the kept pairs'."""
    q, k, v = _qkv(n=200)
    n, mask = q.shape[-2], Causal(0)
    method = make_method("blocktopk", 40, budget_mode="keys", block=16)
    kept = method.key_sets(q, k, v, 0.25, None, mask).rows(0, n).sum(-1).double()
    read = bench.keys_read(method, q, k, v, 0.25, mask)
    assert read == pytest.approx(float(kept.mean()))


def test_rounds_rotate_and_take_the_median(bench):
    """Each entry gets one warm-up call and one timed call per round; the order rotates, so no
    entry is always first; a call that raises is dropped with its message, the others stay."""
    calls: list[str] = []

    def entry(name: str, fail: bool = False):
        def call():
            calls.append(name)
            if fail:
                raise RuntimeError("out of tiles")
            return torch.zeros(1)

        return bench.Contender(name, 0.1, 10, call)

    entries = [entry("sdpa"), entry("a"), entry("b"), entry("bad", fail=True)]
    ticks = itertools.count()
    bench.run_rounds(entries, repeats=3, clock=lambda: float(next(ticks)))
    warm, timed = calls[:4], calls[4:]
    assert warm == ["sdpa", "a", "b", "bad"]
    assert [timed[i * 3] for i in range(3)] == ["sdpa", "a", "b"]  # who goes first rotates
    assert sorted(timed) == sorted(["sdpa", "a", "b"] * 3)
    assert entries[3].samples is None and "out of tiles" in entries[3].error
    assert all(e.samples == [1.0, 1.0, 1.0] for e in entries[:3])  # one tick per timed call


def test_speedup_is_sdpa_over_the_method(bench):
    entries = [
        bench.Contender("sdpa", None, None, None, samples=[4.0, 6.0, 5.0]),
        bench.Contender("a", 0.1, 10, None, samples=[1.0, 3.0, 2.0]),
        bench.Contender("b", 0.1, 10, None, error="unsupported"),
    ]
    rows = {r.method: r for r in bench.time_rows("n = 8", entries)}
    assert rows["sdpa"].speedup == pytest.approx(1.0)
    assert rows["a"].median_s == pytest.approx(2.0) and rows["a"].speedup == pytest.approx(2.5)
    assert rows["a"].spread_s == pytest.approx(2.0)
    assert rows["b"].status == "error" and rows["b"].reason == "unsupported"


def test_contenders_time_what_the_library_computes(bench):
    """The timed call of a method is the library's forward (same output as kdecli.api), SDPA's
    is SDPA's, and a method that cannot be built is an entry with the reason, never a crash."""
    q, k, v = _qkv(n=128)
    shape = bench.TimedShape("tiny", q, k, v, 0.25, (0.25,))
    entries = bench.contenders(shape, ["streaming", "topk"])
    by_name = {e.method: e for e in entries}
    from kdecli.api import attention

    budget = bench.budget_of(0.25, 128)
    want = attention(q, k, v, method="streaming", budget=budget, scale=0.25, is_causal=True)
    got = by_name["streaming"].call()
    torch.testing.assert_close(got, want)
    sdpa = by_name["sdpa"].call()
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    torch.testing.assert_close(sdpa, exact)
    unknown = bench.contenders(shape, ["no_such_method"])[1]
    assert unknown.call is None and "no_such_method" in unknown.error


@pytest.mark.parametrize("n", [128, 4096, 65536])
@pytest.mark.parametrize("rho", [0.02, 0.1, 0.25])
def test_budget_of_computes_that_share_of_the_causal_logits(bench, n, rho):
    """A query at position i reads min(m, i + 1) keys: at m = budget_of(ρ, n) the share of the
    causal logits computed is ρ (to the rounding of m), not the 2ρ of m = ρ·n."""
    m = bench.budget_of(rho, n)
    read = sum(min(m, i + 1) for i in range(n))
    assert read / (n * (n + 1) / 2) == pytest.approx(rho, abs=1.5 / n + 0.002)
