"""The maths of thinformer: exact limit, budget → rounds, every key counts (not only a power of four),
the walk balances, error falls with the budget."""

import math

import pytest
import torch

from kdecli.methods import make_method
from kdecli.methods.thinformer import halving_rounds, thin
from kdecli.metrics import slice_errors
from kdecli.reference import exact_attention
from tests.conftest import gen, make_qkv


@pytest.mark.parametrize("n_q,n_k,d_v", [(47, 47, 21), (97, 59, 13), (1025, 1025, 7), (30, 1025, 21)])
def test_exact_when_the_coreset_is_every_key(n_q, n_k, d_v):
    q, k, v = make_qkv(2, 2, n_q, n_k, 21, d_v)
    out = make_method("thinformer", n_k)(q, k, v, scale=0.3, generator=gen(0))
    assert (out - exact_attention(q, k, v, 0.3)).abs().max() <= 1e-10


def test_rounds_make_the_coreset_closest_to_the_budget():
    assert halving_rounds(1024, 256) == 2
    assert halving_rounds(1024, 300) == 2  # 256 is closer than 512
    assert halving_rounds(1024, 400) == 1  # 512 is closer than 256
    assert halving_rounds(1024, 384) == 1  # a tie keeps the larger, more accurate coreset
    assert halving_rounds(1024, 10**6) == 0
    assert halving_rounds(1000, 1) == 9  # capped so the coreset is never empty
    assert halving_rounds(8192, 256) == 5


@pytest.mark.parametrize("n,budget", [(1025, 64), (1000, 16), (80, 20), (3, 1)])
def test_coreset_has_the_planned_size_and_distinct_keys(n, budget):
    _, k, v = make_qkv(6, 1, 1, n, 8, 4)
    rounds = halving_rounds(n, budget)
    index, valid = thin(k.view(6, n, 8) * 0.5, v.view(6, n, 4), rounds, 0.5, gen(1))
    sizes = valid.sum(-1)
    # each odd group's leftover is kept or dropped by a fair coin: a few points either way
    assert (sizes - n / 2**rounds).abs().max() <= rounds + 1, sizes
    assert (sizes >= 1).all()
    for row, ok in zip(index, valid):
        kept = row[ok].tolist()
        assert len(set(kept)) == len(kept) and min(kept) >= 0 and max(kept) < n


def test_keys_beyond_the_largest_power_of_four_are_used():
    """n_k = 83: the published code thins only 64 keys (4³) and never looks at the other 19.
    Here every key survives two halving rounds with probability 1/4, the tail included, and so do
    the leftovers of the odd groups (sizes 20, 21, 21, 21: keys 40, 61 and 82 have no partner in
    the first round); the output depends on a key beyond 64."""
    n, slices = 83, 2000
    _, k, v = make_qkv(1, 1, 1, n, 8, 4)
    rounds = halving_rounds(n, 21)
    assert rounds == 2
    many_k = (k * math.sqrt(0.3)).view(1, n, 8).expand(slices, -1, -1)
    index, valid = thin(many_k, v.view(1, n, 4).expand(slices, -1, -1), rounds, 0.5, gen(0))
    counts = torch.zeros(n).index_add_(0, index[valid], torch.ones(int(valid.sum())))
    rate = counts / slices  # binomial(2000, 1/4): sd ≈ 0.0097
    assert (rate - 0.25).abs().max() < 0.05, rate
    assert (rate[[40, 61, 82]] > 0.2).all(), rate[[40, 61, 82]]

    q, k, v = make_qkv(1, 1, 30, n, 8, 4)
    method = make_method("thinformer", 21)
    v2 = v.clone()
    v2[..., 77, :] += 10.0
    changed = [
        not torch.equal(method(q, k, v, scale=0.3, generator=gen(s)), method(q, k, v2, scale=0.3, generator=gen(s)))
        for s in range(12)
    ]
    assert any(changed) and not all(changed)  # used when it is in the coreset, about 1 seed in 4


def test_halving_balances_the_kernel_sum():
    """One round on 1024 points of a smooth kernel (unit keys in 3-d): ‖Σ_kept κ − Σ_dropped κ‖²
    is several times smaller than when each pair's survivor is picked by a coin."""
    slices, n = 16, 1024
    _, k, v = make_qkv(slices, 1, 1, n, 3, 4)
    keys = (k / k.norm(dim=-1, keepdim=True)).view(slices, n, 3)
    values = v.view(slices, n, 4)
    kernel = torch.exp(keys @ keys.transpose(-1, -2) - 1)
    kernel = kernel * (values @ values.transpose(-1, -2) + values.abs().amax((-1, -2)).view(-1, 1, 1) ** 2)

    def imbalance(kept):
        signs = torch.full((slices, n), -1.0, dtype=kernel.dtype).scatter_(1, kept, 1.0)
        return float(torch.einsum("sp,spq,sq->s", signs, kernel, signs).mean())

    index, valid = thin(keys, values, 1, 0.5, gen(0))
    assert valid.all() and index.shape == (slices, n // 2)
    coin = torch.randint(0, 2, (slices, n // 2), generator=gen(1))
    assert imbalance(index) < 0.5 * imbalance(torch.arange(0, n, 2) + coin)


def test_error_falls_as_budget_grows():
    q, k, v = make_qkv(1, 2, 1025, 1025, 16, 8, spread=0.8)
    ref = exact_attention(q, k, v, 0.3)
    means = []
    for budget in (16, 128, 512):
        method = make_method("thinformer", budget)
        errs = [slice_errors(method(q, k, v, scale=0.3, generator=gen(s)), ref)["rel_spectral"].mean()
                for s in range(4)]
        means.append(float(torch.stack(errs).mean()))
    assert means[0] > means[1] > means[2], means


def test_thinning_is_fast_enough():
    """n_k = 8192, budget 256: the walk is vectorised over slices and groups (a few seconds at most
    on two CPU cores; typically well under one)."""
    q, k, v = make_qkv(1, 2, 256, 8192, 64, 64, dtype=torch.float32)
    import time

    start = time.perf_counter()
    out = make_method("thinformer", 256)(q, k, v, scale=0.125, generator=gen(0))
    assert time.perf_counter() - start < 10
    assert torch.isfinite(out).all()
