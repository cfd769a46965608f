"""The oracles: topk against a brute-force top-m, rankk against a direct truncated SVD, topk against
uniform sampling, and the size limits they refuse beyond.  Their exact limits and the error falling
with the budget are in the contract battery."""

import pytest
import torch

from kdecli.masks import FULL, Causal
from kdecli.measure.reference import exact_attention
from kdecli.methods import make_method
from kdecli.methods.oracles import rank_m_attention
from tests.conftest import make_qkv, mean_error


def brute_topk(q, k, v, scale, m, mask):
    logits = scale * q @ k.transpose(-1, -2)
    allowed = mask.allowed(q.shape[-2], k.shape[-2])
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for idx in torch.cartesian_prod(*(torch.arange(s) for s in q.shape[:-1])).tolist():
        row = logits[tuple(idx)]
        keep = torch.argsort(row, descending=True)[:m]
        keep = keep[torch.isfinite(row[keep])]
        b, h = idx[0], idx[1]
        out[tuple(idx)] = torch.softmax(row[keep], -1) @ v[b, h, keep]
    return out


@pytest.mark.parametrize(
    "n_q,n_k,mask",
    [
        (47, 47, FULL),
        (97, 59, FULL),
        (97, 97, Causal(0)),
        (7, 97, Causal(90)),
        (30, 97, Causal(41)),
    ],
    ids=str,
)
def test_topk_matches_brute_force(n_q, n_k, mask):
    q, k, v = make_qkv(1, 2, n_q, n_k, 21, 13)
    out = make_method("topk", 10)(q, k, v, scale=0.3, mask=mask)
    assert (out - brute_topk(q, k, v, 0.3, 10, mask)).abs().max() <= 1e-12


def test_topk_beats_uniform_sampling():
    """The ceiling of sparse methods: its m keys beat m random ones (mean over seeds)."""
    q, k, v = make_qkv(1, 2, 1025, 1025, 16, 8)
    ref = exact_attention(q, k, v, 0.5)
    topk, uniform = (
        mean_error(make_method(name, 128), q, k, v, 0.5, ref, range(3))
        for name in ("topk", "uniform")
    )
    assert topk < uniform, (topk, uniform)


@pytest.mark.parametrize("n_q,n_k", [(97, 97), (97, 59), (59, 97)])
def test_rankk_is_the_truncated_svd(n_q, n_k):
    q, k, v = make_qkv(1, 2, n_q, n_k, 21, 13)
    p = torch.softmax(0.3 * q @ k.transpose(-1, -2), dim=-1)
    u, s, vh = torch.linalg.svd(p, full_matrices=False)
    m = 10
    best = (u[..., :m] * s[..., None, :m]) @ vh[..., :m, :] @ v
    out = make_method("rankk", m)(q, k, v, scale=0.3)
    assert (out - best).abs().max() <= 1e-9


@pytest.mark.parametrize("name,default", [("topk", 131072), ("rankk", 8192)])
def test_oracles_refuse_above_their_limit_and_say_how_to_raise_it(name, default):
    method = make_method(name, 16)
    big = torch.empty(1, 1, default + 1, 4)
    small = torch.empty(1, 1, default, 4)
    assert method.not_supported_reasons(small, small, small) == []
    (reason,) = method.not_supported_reasons(big, big, big)
    assert f"max_n={default}" in reason and f"n_q={default + 1}" in reason
    assert f"--param max_n={default + 1}" in reason
    lowered = make_method(name, 16, max_n=50)
    q, k, v = make_qkv(1, 1, 40, 60, 8)
    (reason,) = lowered.not_supported_reasons(q, k, v)
    assert "n_k=60" in reason and "max_n=50" in reason
    assert make_method(name, 16, max_n=60).not_supported_reasons(q, k, v) == []


def test_causal_rankk_is_exact_halves_plus_a_rank_m_full_block():
    """One level of the decomposition by hand: the causal halves exact, the full block (queries
    8..15 after keys 0..7) replaced by its best rank-2 approximation, merged by exact row sums."""
    q, k, v = make_qkv(1, 1, 16, 16, 8, dtype=torch.float64)
    scale = 0.4
    out = make_method("rankk", 2, causal_leaf=8)(q, k, v, scale=scale, mask=Causal(0))
    lower = rank_m_attention(q[..., 8:, :], k[..., :8, :], v[..., :8, :], scale, 2)
    logits = scale * q @ k.mT
    causal = logits.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    diag_sum = causal[..., 8:, 8:].exp().sum(-1, keepdim=True)
    low_sum = logits[..., 8:, :8].exp().sum(-1, keepdim=True)
    diag = exact_attention(q[..., 8:, :], k[..., 8:, :], v[..., 8:, :], scale, mask=Causal(0))
    expected = (diag_sum * diag + low_sum * lower) / (diag_sum + low_sum)
    assert torch.allclose(out[..., 8:, :], expected, atol=1e-12)
    first_half = exact_attention(q[..., :8, :], k[..., :8, :], v[..., :8, :], scale, mask=Causal(0))
    assert torch.allclose(out[..., :8, :], first_half, atol=1e-12)
    assert not torch.allclose(out, exact_attention(q, k, v, scale, mask=Causal(0)), atol=1e-6)
