"""The shared causal decomposition (kdecli/methods/causal.py, docs/methods.md) on its own: with an
exact full block it is exact at every length, its pieces cover the causal triangle once, and its
cost model counts what it runs.  Every method's no-future-leak, exactness and falling error under
it are in the contract battery."""

import pytest
import torch

from kdecli.masks import FULL, Causal
from kdecli.measure.reference import exact_attention
from kdecli.methods import make_method, method_names
from kdecli.methods.causal import (
    Partial,
    causal_by_halves,
    decomposed_flops,
    exact_partial,
    full_blocks,
    leaf_count,
)
from tests.conftest import make_qkv


def exact_full_block(scale, calls=None):
    def full_block(q, k, v, query_offset):
        if calls is not None:
            calls.append((q.shape, k.shape, query_offset))
        return exact_partial(q * scale, k, v)

    return full_block


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 64, 97, 128, 129, 255])
@pytest.mark.parametrize("leaf", [1, 4, 16])
def test_exact_full_blocks_give_exact_causal_attention(n, leaf):
    q, k, v = make_qkv(2, 3, n, n, 10, 6, dtype=torch.float64)
    lse, out = causal_by_halves(exact_full_block(0.4), q, k, v, 0.4, leaf)
    ref = exact_attention(q, k, v, 0.4, mask=Causal(0))
    assert (out - ref).abs().max() <= 1e-12
    logits = (0.4 * q @ k.mT).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -torch.inf)
    assert (lse - torch.logsumexp(logits, -1)).abs().max() <= 1e-12


def test_one_call_per_level_with_the_halves_stacked_as_heads():
    q, k, v = make_qkv(2, 3, 100, 100, 10, 6, dtype=torch.float64)
    calls = []
    causal_by_halves(exact_full_block(0.4, calls), q, k, v, 0.4, leaf=10)
    # 100 -> full blocks of 50 (1 piece), 25 (2); 25 is odd, padded to 26 -> 13 (4); 13 -> 14 -> 7
    # (8), leaving 16 leaves of 7.  The deepest level runs first (the halves recurse first).
    levels = [(1, 50), (2, 25), (4, 13), (8, 7)]
    assert [(s[1], s[2], off) for s, _, off in calls] == [(3 * p, n, n) for p, n in levels][::-1]
    assert full_blocks(100, 10) == levels
    assert leaf_count(100, 10) == (16, 7)


def test_a_wrong_row_sum_changes_the_merge():
    """The merge weighs pieces by their row sums: a block that reports half its row sum moves the
    output (so the exactness above is not an accident of equal weights)."""
    q, k, v = make_qkv(1, 1, 32, 32, 8, dtype=torch.float64)
    exact = exact_full_block(0.5)

    def halved(qb, kb, vb, offset):
        lse, out = exact(qb, kb, vb, offset)
        return Partial(lse - 0.7, out)

    _, out = causal_by_halves(halved, q, k, v, 0.5, leaf=8)
    assert (out - exact_attention(q, k, v, 0.5, mask=Causal(0))).abs().max() > 1e-3


@pytest.mark.parametrize("n, leaf", [(1024, 128), (1000, 100), (4096, 1)])
def test_the_pieces_cover_the_causal_triangle(n, leaf):
    """Full blocks (size² pairs each) and leaves (a causal triangle each) hold n(n+1)/2 pairs, plus
    the pairs of appended rows when a piece is odd."""
    covered = sum(pieces * size * size for pieces, size in full_blocks(n, leaf))
    pieces, size = leaf_count(n, leaf)
    covered += pieces * size * (size + 1) // 2
    padded = 1024 if n == 1000 else n  # 1000 -> 500 -> 250 -> 125 -> 63 (padded)
    assert n * (n + 1) // 2 <= covered <= padded * (padded + 1) // 2


def test_the_cost_model_sums_the_method_over_the_levels():
    method = make_method("kdeformer", 64)
    n, d = 4096, 32
    by_hand = sum(method.flops(1, 2 * p, s, s, d, d) for p, s in full_blocks(n, 64))
    pieces, size = leaf_count(n, 64)
    by_hand += 2 * pieces * size * (size + 1) / 2 * (4 * d + 1)
    assert decomposed_flops(method, 1, 2, n, d, d) == pytest.approx(by_hand)
    assert method.cost(1, 2, n, n, d, d, Causal(0)) == pytest.approx(by_hand)
    assert method.cost(1, 2, n, n, d, d, FULL) == method.flops(1, 2, n, n, d, d)


@pytest.mark.parametrize("name", method_names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_causal_half_precision_stays_finite_with_large_logits(name, dtype):
    method = make_method(name, 16 if name not in ("exact", "mean") else None)
    if method.needs_prompt_queries:  # no forward of its own: tests/test_kvcache_prompt.py
        pytest.skip(f"{name} runs as decode steps over the prompt's queries only")
    q, k, v = make_qkv(1, 2, 97, 97, 21, 13, dtype=dtype, spread=12.0)
    out = method(
        q, k, v, scale=21**-0.5, mask=Causal(0), generator=torch.Generator().manual_seed(0)
    )
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
