"""Aligned pairing of sorted-LSH blocks (docs/methods.md) for kdeformer and hyperattention: each
query scores the key_block sorted keys around its own rank, tiles of queries share one window, and
the contract's properties hold for both pairings (the battery itself runs the default)."""

import pytest
import torch

from kdecli.masks import FULL, Causal
from kdecli.measure.reference import exact_attention
from kdecli.methods import make_method
from kdecli.methods.kdeformer import kdeformer_numerator
from kdecli.methods.lsh import AlignedBlocks, hamming_rank, random_directions, sort_into_blocks
from tests.conftest import gen, make_qkv, rounding_bound

METHODS = ["kdeformer", "hyperattention"]
PAIRINGS = ["rank", "aligned"]


def windows(blocks: AlignedBlocks) -> torch.Tensor:
    """For every sorted query (b, h, n_q), the original indices of the keys it scores, (…, B)."""
    starts = blocks.tile_start.repeat_interleave(blocks.query_block, -1)[..., : blocks.n_q]
    positions = starts.unsqueeze(-1) + torch.arange(blocks.key_block)
    return torch.gather(blocks.k_order, -1, positions.flatten(2)).view(*positions.shape)


def test_each_block_scores_the_keys_around_its_queries_ranks():
    """Block t's window starts B/2 before p_med, the middle of the sorted keys that share its
    median query's rank, clamped into [0, n_k − B]; for queries and keys drawn alike most
    queries' own p falls inside their block's window (with rank pairing on Q ≠ K it need not)."""
    q, k, _ = make_qkv(1, 2, 400, 400, 8)
    blocks = sort_into_blocks(q, k, 32, 7, gen(0), "aligned")
    directions = random_directions(1, 2, 8, 7, dtype=q.dtype, device=q.device, generator=gen(0))
    q_rank, k_rank = hamming_rank(q, directions), hamming_rank(k, directions)
    sorted_k_rank = torch.sort(k_rank, stable=True).values
    own = torch.gather(q_rank, -1, blocks.q_order)  # ranks of the sorted queries
    low = torch.searchsorted(sorted_k_rank, own, side="left")
    high = torch.searchsorted(sorted_k_rank, own, side="right")
    middle = (low + high) // 2
    bq = blocks.query_block
    medians = (torch.arange(blocks.num_blocks) * bq + bq // 2).clamp(max=399)
    assert torch.equal(blocks.tile_start, (middle[..., medians] - 16).clamp(0, 400 - 32))
    starts = blocks.tile_start.repeat_interleave(bq, -1)[..., :400]
    inside = (middle >= starts) & (middle < starts + 32)
    assert inside.float().mean() >= 0.75  # 0.80 here
    chosen = windows(blocks)
    ranks = torch.gather(k_rank, -1, chosen.flatten(2)).view(chosen.shape)
    assert torch.equal(ranks.sort(-1).values, ranks)  # consecutive sorted keys


def test_the_kdeformer_numerator_is_its_window_plus_weighted_samples_outside_it():
    """N_i = Σ_{j ∈ window(i)} e^{ℓ_ij} ṽ_j + Σ_t [π_t ∉ window(i)] e^{ℓ_iπ_t} ṽ_π_t w_t, against a
    dense computation from the windows (shift 0)."""
    q, k, v = make_qkv(1, 1, 150, 150, 8, 5, spread=0.6, dtype=torch.float64)
    blocks = sort_into_blocks(q, k, 16, 3, gen(0), "aligned")
    index = torch.randint(150, (1, 1, 24), generator=gen(1))
    weight = torch.rand(1, 1, 24, generator=gen(2), dtype=torch.float64)
    num, den = kdeformer_numerator(
        q, k, v, 0.5, blocks, index, weight, shift=torch.zeros(1, 1, 150)
    )
    a = torch.exp(0.5 * q @ k.mT)[0, 0]
    chosen = windows(blocks)[0, 0]
    for i, query in enumerate(blocks.q_order[0, 0].tolist()):
        inside = set(chosen[i].tolist())
        expected = a[query, chosen[i]] @ v[0, 0, chosen[i]]
        expected_den = a[query, chosen[i]].sum()
        for t in range(24):
            j = int(index[0, 0, t])
            if j not in inside:
                expected = expected + a[query, j] * v[0, 0, j] * weight[0, 0, t]
                expected_den = expected_den + a[query, j] * weight[0, 0, t]
        assert torch.allclose(num[0, 0, query], expected, rtol=1e-10)
        assert torch.allclose(den[0, 0, query], expected_den, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 2, 97, 97), (1, 2, 59, 97), (1, 1, 1025, 97)])
@pytest.mark.parametrize("name", METHODS)
def test_both_pairings_are_exact_when_one_window_holds_every_key(name, shape, causal):
    """Causal with n_q < n_k: the queries after a prefix of keys (bottom-right)."""
    b, h, n_q, n_k = shape
    if causal and n_q > n_k:
        pytest.skip("a causal mask needs n_q <= n_k")
    mask = Causal.bottom_right(n_q, n_k) if causal else FULL
    q, k, v = make_qkv(b, h, n_q, n_k, 21, 13)
    for pairing in PAIRINGS:
        method = make_method(name, 16, pairing=pairing, block_size=n_k)
        out = method(q, k, v, scale=0.2, generator=gen(0), mask=mask)
        ref = exact_attention(q, k, v, 0.2, mask=mask)
        assert (out - ref).abs().max() <= rounding_bound(q, k, v, 0.2), pairing


@pytest.mark.parametrize("name", METHODS)
def test_aligned_batch_slices_independent_and_no_future_key_leak(name):
    method = make_method(name, 16, pairing="aligned")
    q, k, v = make_qkv(3, 2, 97, 97, 21, 13)
    out = method(q, k, v, scale=0.2, generator=gen(2))
    k2 = k.clone()
    k2[1] = k2[1].flip(-2)
    out2 = method(q, k2, v, scale=0.2, generator=gen(2))
    assert torch.equal(out[0], out2[0]) and torch.equal(out[2], out2[2])
    causal = method(q, k, v, scale=0.2, generator=gen(4), mask=Causal(0))
    k3, v3 = k.clone(), v.clone()
    k3[..., 50:, :] *= -2
    v3[..., 50:, :] += 1
    again = method(q, k3, v3, scale=0.2, generator=gen(4), mask=Causal(0))
    assert torch.equal(causal[..., :50, :], again[..., :50, :])


@pytest.mark.parametrize("name", METHODS)
def test_aligned_gradcheck_and_large_logits(name):
    method = make_method(name, 16, pairing="aligned")
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 1, 21, 21, 4, 3, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda q, k, v: method(q, k, v, scale=0.5, generator=gen(7)), (q, k, v), atol=1e-5
    )
    q, k, v = make_qkv(1, 2, 97, 59, 21, 13, dtype=torch.float32, spread=12.0)
    assert torch.isfinite(method(q, k, v, scale=21**-0.5, generator=gen(0))).all()


def test_aligned_error_is_lower_when_queries_and_keys_differ():
    """Keys drawn around other centres than the queries (Q ≠ K): rank pairing hands a query block
    the key block of the same index, aligned the keys nearest its code; over 4 seeds the aligned
    error is lower for both methods."""
    from tests.conftest import mean_error

    g = gen(5)
    q = torch.randn(1, 2, 1024, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 1024, 16, generator=g, dtype=torch.float64) * 1.5 + 0.5
    v = torch.randn(1, 2, 1024, 8, generator=g, dtype=torch.float64)
    ref = exact_attention(q, k, v, 0.25)
    for name in METHODS:
        rank, aligned = (
            mean_error(make_method(name, 64, pairing=p), q, k, v, 0.25, ref, range(4))
            for p in PAIRINGS
        )
        assert aligned < rank, (name, rank, aligned)


def test_auto_takes_rank_pairing_when_the_keys_are_the_queries():
    from kdecli.methods.lsh import resolve_pairing

    q, k, v = make_qkv(1, 2, 200, 200, 16)
    assert resolve_pairing("auto", q, q.clone()) == "rank"
    assert resolve_pairing("auto", q, k) == "aligned"
    assert resolve_pairing("rank", q, k) == "rank"
    for name in METHODS:
        default = make_method(name, 32)
        assert default.config["pairing"] == "auto"
        same = default(q, q, v, scale=0.2, generator=gen(1))
        assert torch.equal(
            same, make_method(name, 32, pairing="rank")(q, q, v, scale=0.2, generator=gen(1))
        )
        other = default(q, k, v, scale=0.2, generator=gen(1))
        assert torch.equal(
            other, make_method(name, 32, pairing="aligned")(q, k, v, scale=0.2, generator=gen(1))
        )
