"""The maths of uniform sampling: a uniform subset without replacement, causal prefixes.  The exact
limit and the error falling with the budget are in the contract battery."""

import torch

import kdecli.methods.uniform as uniform_module
from kdecli.masks import FULL, Causal
from kdecli.measure.reference import exact_attention
from kdecli.methods import make_method
from kdecli.methods.uniform import sampled_attention
from tests.conftest import gen, make_qkv


def capture_index(monkeypatch):
    seen = []

    def spy(q_scaled, k, v, index, mask):
        seen.append(index)
        return sampled_attention(q_scaled, k, v, index, mask)

    monkeypatch.setattr(uniform_module, "sampled_attention", spy)
    return seen


def test_draws_a_uniform_subset_without_replacement(monkeypatch):
    seen = capture_index(monkeypatch)
    n, m, slices = 50, 10, 2000
    q, k, v = make_qkv(slices, 1, 3, n, 4)
    make_method("uniform", m)(q, k, v, scale=0.3, generator=gen(0))
    index = seen[0]
    assert index.shape == (slices, 1, m)
    assert all(len(set(row)) == m for row in index.view(slices, m).tolist())  # no repeats
    counts = torch.bincount(index.flatten(), minlength=n).double()
    expected = slices * m / n  # 400 each; binomial sd = sqrt(400·0.8) ≈ 18
    assert (counts - expected).abs().max() < 5 * (expected * (1 - m / n)) ** 0.5


def test_estimate_is_the_softmax_over_the_sampled_keys():
    q, k, v = make_qkv(1, 2, 30, 60, 21, 13)
    index = torch.tensor([[3, 17, 18, 40, 59], [0, 1, 2, 30, 31]]).view(1, 2, 5)
    out = sampled_attention(q * 0.3, k, v, index, FULL)
    for head in range(2):
        keys = index[0, head]
        probs = torch.softmax(0.3 * q[0, head] @ k[0, head, keys].T, dim=-1)
        assert (out[0, head] - probs @ v[0, head, keys]).abs().max() <= 1e-12


def test_causal_uses_sampled_prefix_and_exact_attention_before_the_first_sample():
    q, k, v = make_qkv(1, 1, 97, 97, 21, 13)
    index = torch.tensor([10, 20, 50, 80]).view(1, 1, 4)
    out = sampled_attention(q * 0.3, k, v, index, Causal(0))
    exact = exact_attention(q, k, v, 0.3, mask=Causal(0))
    # queries 0..9 see no sampled key: exact attention over their prefix
    assert (out[..., :10, :] - exact[..., :10, :]).abs().max() <= 1e-12
    for i in (10, 35, 50, 96):
        keys = index[0, 0][index[0, 0] <= i]
        probs = torch.softmax(0.3 * q[0, 0, i] @ k[0, 0, keys].T, dim=-1)
        assert (out[0, 0, i] - probs @ v[0, 0, keys]).abs().max() <= 1e-12
    assert (out[..., 10, :] - v[..., 10, :]).abs().max() <= 1e-12  # only key 10 in its prefix


def test_an_offset_places_query_i_at_position_offset_plus_i():
    """Under Causal(67), 30 queries against 97 keys: query i uses the sampled keys up to 67 + i,
    and the queries before the first sample (positions 67..74) attend exactly to their prefix."""
    q, k, v = make_qkv(1, 1, 30, 97, 21, 13)
    mask = Causal(67)
    index = torch.tensor([75, 80, 90]).view(1, 1, 3)
    out = sampled_attention(q * 0.3, k, v, index, mask)
    exact = exact_attention(q, k, v, 0.3, mask=mask)
    assert (out[..., :8, :] - exact[..., :8, :]).abs().max() <= 1e-12
    assert (out[..., 8, :] - v[..., 75, :]).abs().max() <= 1e-12  # only key 75 in its prefix
    for i in (13, 23, 29):
        keys = index[0, 0][index[0, 0] <= 67 + i]
        probs = torch.softmax(0.3 * q[0, 0, i] @ k[0, 0, keys].T, dim=-1)
        assert (out[0, 0, i] - probs @ v[0, 0, keys]).abs().max() <= 1e-12
