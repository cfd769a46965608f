"""The maths of kdeformer: Gray order, unbiased residual, every sampling exact at one block.

The exact limit, the error falling with the budget and batch isolation with padded blocks (the
released code leaked blocks across batch items) are in the contract battery."""

import pytest
import torch

from kdecli.measure.reference import exact_attention
from kdecli.methods import make_method
from kdecli.methods.common import with_ones_column
from kdecli.methods.kdeformer import SAMPLINGS, KDEformer, kdeformer_numerator
from kdecli.methods.lsh import gray_rank_table, sort_into_blocks
from tests.conftest import clustered_self_attention as glove_like
from tests.conftest import gen, make_qkv, mean_error, rounding_bound


def test_gray_rank_orders_codes_by_single_bit_flips():
    table = gray_rank_table(5)
    order = torch.argsort(table)  # codes listed in Gray order
    flips = order[1:] ^ order[:-1]
    assert all(bin(int(x)).count("1") == 1 for x in flips)
    assert sorted(table.tolist()) == list(range(32))


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_exact_at_one_block_whatever_the_sampling(sampling):
    """The battery checks the default sampling at the limit; the other probabilities (column-norm
    reads the exact attention matrix) must leave every sample masked out too."""
    q, k, v = make_qkv(2, 2, 97, 59, 21, 13)
    method = make_method("kdeformer", 64, sampling=sampling, **KDEformer.exact_limit(97, 59))
    out = method(q, k, v, scale=0.25, generator=gen(0))
    assert (out - exact_attention(q, k, v, 0.25)).abs().max() <= rounding_bound(q, k, v, 0.25)


def test_residual_is_unbiased_estimate_of_off_block_sum():
    """E[sampled part] = Σ_{j ∉ block(i)} e^{ℓ_ij} ṽ_j, for fixed blocks (shift c = 0)."""
    q, k, v = make_qkv(1, 1, 97, 97, 8, 5, spread=0.6)
    scale = 0.5
    g = gen(0)
    blocks = sort_into_blocks(q, k, block_size=16, num_projs=3, generator=g)
    v_aug = with_ones_column(v)
    method = make_method("kdeformer", 32, block_size=16, samples=32)
    zero_shift = torch.zeros(1, 1, 97, dtype=torch.float64)
    no_samples = (torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, dtype=torch.float64))

    def numerator(index, weight):  # N_i with its row-sum column, as one (n_q, d_v + 1) matrix
        num, den = kdeformer_numerator(q, k, v, scale, blocks, index, weight, shift=zero_shift)
        return torch.cat([num, den.unsqueeze(-1)], dim=-1)

    block_only = numerator(*no_samples)
    # a single zero-weight sample adds nothing, so block_only is exactly the in-block sum
    a = torch.exp(scale * q @ k.transpose(-1, -2))
    full = a @ v_aug
    off_block_exact = full - block_only
    trials = 4000
    total = torch.zeros_like(full)
    for _ in range(trials):
        index, weight = method.draw_samples(q, k, v, scale, g)
        total += numerator(index, weight)
    estimate = total / trials - block_only
    # Monte-Carlo standard error from a second, independent set of per-trial estimates
    rel = (estimate - off_block_exact).norm() / off_block_exact.norm()
    assert rel < 0.02, rel
    # and a biased estimator (weights halved) is caught by the same check
    assert ((estimate * 0.5) - off_block_exact).norm() / off_block_exact.norm() > 0.3


def test_column_norm_oracle_beats_uniform_sampling_on_peaked_attention():
    q, k, v = glove_like(seed=1)
    scale = 0.6
    ref = exact_attention(q, k, v, scale)
    oracle, uniform = (
        mean_error(make_method("kdeformer", 64, sampling=sampling), q, k, v, scale, ref, range(4))
        for sampling in ("column-norm", "uniform")
    )
    assert oracle < uniform, (oracle, uniform)


def test_float32_logits_in_the_hundreds_stay_accurate():
    q, k, v = make_qkv(1, 2, 97, 97, 21, spread=10.0)
    scale = 21**-0.5
    assert (scale * q @ k.transpose(-1, -2)).abs().max() > 300
    ref = exact_attention(q, k, v, scale)
    q32, k32, v32 = q.float(), k.float(), v.float()
    sampled = make_method("kdeformer", 64)(q32, k32, v32, scale=scale, generator=gen(0))
    assert torch.isfinite(sampled).all()
    # at the exact limit the float32 result is as accurate as float32 rounding allows
    exact_limit = make_method("kdeformer", 64, block_size=97)(
        q32, k32, v32, scale=scale, generator=gen(0)
    )
    assert (exact_limit.double() - ref).abs().max() < 1e-2 * v.abs().max()
