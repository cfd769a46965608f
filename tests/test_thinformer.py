"""The maths of thinformer: budget → rounds, every key counts (not only a power of four), the walk
balances, and it is batched.  The exact limit and the error falling with the budget are in the
contract battery; its speed is measured in benchmarks/bench_methods.py."""

import math

import pytest
import torch

import kdecli.methods.thinformer as thinformer_module
from kdecli.methods import make_method
from kdecli.methods.thinformer import halving_rounds, thin
from tests.conftest import gen, make_qkv


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
        not torch.equal(
            method(q, k, v, scale=0.3, generator=gen(s)),
            method(q, k, v2, scale=0.3, generator=gen(s)),
        )
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
    kernel = kernel * (
        values @ values.transpose(-1, -2) + values.abs().amax((-1, -2)).view(-1, 1, 1) ** 2
    )

    def imbalance(kept):
        signs = torch.full((slices, n), -1.0, dtype=kernel.dtype).scatter_(1, kept, 1.0)
        return float(torch.einsum("sp,spq,sq->s", signs, kernel, signs).mean())

    index, valid = thin(keys, values, 1, 0.5, gen(0))
    assert valid.all() and index.shape == (slices, n // 2)
    coin = torch.randint(0, 2, (slices, n // 2), generator=gen(1))
    assert imbalance(index) < 0.5 * imbalance(torch.arange(0, n, 2) + coin)


def test_the_walk_is_batched_over_slices_and_groups(monkeypatch):
    """The only Python loop is the walk over the pairs of one group.  n_k = 8192, budget 256: five
    rounds, each one call for all 2 slices and all groups at once, 16 + 32 + … + 256 = 496 steps in
    all (≤ 2m), where a walk per group would take about n_k = 8192."""
    calls = []

    def spy(gram, draws):
        calls.append(tuple(draws.shape))  # (slices, groups, pairs per group)
        return walk(gram, draws)

    walk = thinformer_module._walk
    monkeypatch.setattr(thinformer_module, "_walk", spy)
    q, k, v = make_qkv(1, 2, 4, 8192, 8, 4, dtype=torch.float32)
    out = make_method("thinformer", 256)(q, k, v, scale=0.3, generator=gen(0))
    assert torch.isfinite(out).all()
    assert len(calls) == halving_rounds(8192, 256) == 5
    assert all(slices == 2 for slices, _, _ in calls)
    assert [groups for _, groups, _ in calls] == [256, 64, 16, 4, 1]
    assert sum(pairs for _, _, pairs in calls) == 496
