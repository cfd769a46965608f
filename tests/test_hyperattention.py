"""The maths of hyperattention: the exact limits the battery does not check (below min_seq_len, the
causal recursion), no double counting, unbiasedness."""

import math

import pytest
import torch

from kdecli.masks import FULL, Causal
from kdecli.measure.metrics import slice_errors
from kdecli.measure.reference import exact_attention
from kdecli.methods import make_method
from kdecli.methods.hyperattention import hyper_lse
from kdecli.methods.lsh import SortedBlocks, sort_into_blocks
from tests.conftest import gen, make_qkv, rounding_bound


def exact_lse(q, k, scale):
    return torch.logsumexp(scale * q @ k.transpose(-1, -2), dim=-1)


@pytest.mark.parametrize("mask", [FULL, Causal(0)], ids=str)
def test_exact_below_min_seq_len(mask):
    q, k, v = make_qkv(2, 2, 97, 97, 21, 13)
    method = make_method("hyperattention", 16, min_seq_len=98)
    out = method(q, k, v, scale=0.3, generator=gen(0), mask=mask)
    error = (out - exact_attention(q, k, v, 0.3, mask=mask)).abs().max()
    assert error <= rounding_bound(q, k, v, 0.3)
    # and at min_seq_len = n_k it approximates (only "below" is exact)
    approx = make_method("hyperattention", 16, min_seq_len=97)(q, k, v, scale=0.3, generator=gen(0))
    assert (approx - exact_attention(q, k, v, 0.3)).abs().max() > 1e-3


@pytest.mark.parametrize("n", [97, 1025])
def test_causal_recursion_is_exact_at_its_limit(n):
    """block_size = ⌈n/2⌉: one split (with the odd-length padding row), exact halves, and a
    lower-left block that one LSH block covers; the log-sum-exp merge must then be exact."""
    q, k, v = make_qkv(1, 2, n, n, 21, 13)
    method = make_method("hyperattention", 16, block_size=-(-n // 2), samples=16)
    out = method(q, k, v, scale=0.3, generator=gen(1), mask=Causal(0))
    error = (out - exact_attention(q, k, v, 0.3, mask=Causal(0))).abs().max()
    assert error <= rounding_bound(q, k, v, 0.3)


def test_deep_causal_recursion_converges_with_samples():
    """Six levels of recursion (block_size 16, n = 1025).  Every lower-left estimate is unbiased,
    so the error must fall like 1/√samples (×8 fewer for 64× the samples); a wrong merge or a
    wrong sample weight would leave a floor instead."""
    q, k, v = make_qkv(1, 2, 1025, 1025, 16, 8, spread=0.7)
    ref = exact_attention(q, k, v, 0.3, mask=Causal(0))
    errors = []
    for samples in (32, 2048):
        method = make_method("hyperattention", 16, block_size=16, samples=samples)
        out = method(q, k, v, scale=0.3, generator=gen(2), mask=Causal(0))
        assert torch.allclose(out[..., 0, :], v[..., 0, :], atol=1e-12)  # query 0 sees key 0 only
        errors.append(float(slice_errors(out, ref)["rel_frobenius"].mean()))
    assert errors[1] < errors[0] / 4, errors


def test_every_key_sampled_once_gives_exact_attention():
    """Samples = each key exactly once (weight n_k/m = 1): the masked residual adds exactly the
    off-block keys, so the result is exact for any block layout.  Counting an in-block key twice
    (no mask) would break this."""
    q, k, v = make_qkv(2, 2, 97, 97, 21, 13)
    scale = 0.3
    blocks = sort_into_blocks(q * scale, k, block_size=16, num_projs=3, generator=gen(0))
    assert blocks.num_blocks > 1
    everything = torch.arange(97).expand(2, 2, 97)
    lse, out = hyper_lse(q * scale, k, v, blocks, everything)
    assert (out - exact_attention(q, k, v, scale)).abs().max() <= 1e-10
    assert (lse - exact_lse(q, k, scale)).abs().max() <= 1e-10


def test_samples_inside_the_query_block_add_nothing():
    """When every sample lands in block 0, queries of block 0 get exactly the block-only softmax."""
    q, k, v = make_qkv(1, 1, 97, 97, 21, 13)
    scale = 0.3
    blocks = sort_into_blocks(q * scale, k, block_size=16, num_projs=3, generator=gen(0))
    block0_keys = blocks.k_order[..., :16]
    samples = block0_keys.repeat(1, 1, 3)  # 48 samples, all in block 0
    lse, out = hyper_lse(q * scale, k, v, blocks, samples)
    queries = blocks.q_order[0, 0, : blocks.query_block]
    keys = block0_keys[0, 0]
    logits = scale * q[0, 0, queries] @ k[0, 0, keys].T
    block_only = torch.softmax(logits, dim=-1) @ v[0, 0, keys]
    assert (out[0, 0, queries] - block_only).abs().max() <= 1e-12
    assert (lse[0, 0, queries] - torch.logsumexp(logits, dim=-1)).abs().max() <= 1e-12
    # queries of other blocks do use those samples (weight n_k/m): not block-only
    other = blocks.q_order[0, 0, blocks.query_block : 2 * blocks.query_block]
    keys1 = blocks.k_order[0, 0, 16:32]
    block1_only = torch.softmax(scale * q[0, 0, other] @ k[0, 0, keys1].T, -1) @ v[0, 0, keys1]
    assert (out[0, 0, other] - block1_only).abs().max() > 1e-3


def test_sampled_row_sum_is_unbiased():
    """E[e^{L}] = Σ_j e^{ℓ_ij}: the sampled part's log-sum-exp carries log(n_k/m).  The trials
    run as batch items sharing one block layout."""
    q, k, v = make_qkv(1, 1, 97, 97, 8, 5, spread=0.6)
    scale, trials, m = 0.5, 4000, 24
    g = gen(3)
    one = sort_into_blocks(q * scale, k, block_size=16, num_projs=3, generator=g)
    blocks = SortedBlocks(
        one.q_order.expand(trials, 1, -1),
        one.k_order.expand(trials, 1, -1),
        one.num_blocks,
        one.query_block,
        one.key_block,
        one.n_q,
        one.n_k,
    )
    many = [x.expand(trials, -1, -1, -1) for x in (q * scale, k, v)]
    lse, _ = hyper_lse(*many, blocks, torch.randint(97, (trials, 1, m), generator=g))
    estimate = torch.exp(lse).mean(0)
    truth = torch.exp(exact_lse(q, k, scale))[0]
    rel = ((estimate - truth).norm() / truth.norm()).item()
    assert rel < 0.01, rel
    assert ((estimate * math.exp(0.1) - truth).norm() / truth.norm()).item() > 0.05
