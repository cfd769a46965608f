import math

import pytest
import torch
import torch.nn.functional as F

from kdecli.masks import FULL, Causal
from kdecli.measure.figures import Summary
from kdecli.measure.metrics import slice_errors
from kdecli.measure.reference import (
    attention_column_sq_norms,
    attention_spectral_norm,
    chunk_rows,
    exact_attention,
)
from tests.conftest import make_qkv


@pytest.mark.parametrize(
    "n_q, mask", [(59, FULL), (97, Causal(0)), (7, Causal(90)), (30, Causal(41))], ids=str
)
@pytest.mark.parametrize("memory", [4096, 10**6, 10**9])
def test_chunked_reference_matches_sdpa_in_float64(n_q, mask, memory):
    """Against SDPA with the boolean matrix of allowed pairs j ≤ offset + i (and its own
    ``is_causal`` for prefill), chunk by chunk (4096 bytes: one query per chunk)."""
    n_k = 97
    q, k, v = make_qkv(2, 3, n_q, n_k, 21, 13, spread=2.0)
    ref = exact_attention(q, k, v, 0.3, mask=mask, memory_bytes=memory)
    allowed = mask.allowed(n_q, n_k)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3)
    # two float64 computations of the same sums: a few ulps times the row length
    assert (ref - sdpa).abs().max() <= 64 * n_k * torch.finfo(torch.float64).eps
    if mask == Causal(0):
        sdpa = F.scaled_dot_product_attention(q, k, v, scale=0.3, is_causal=True)
        assert (ref - sdpa).abs().max() <= 64 * n_k * torch.finfo(torch.float64).eps


def test_masked_norms_are_those_of_the_masked_matrix():
    """Column norms and ‖D⁻¹A‖₂ under Causal(offset), in small chunks, against the dense P."""
    q, k, v = make_qkv(1, 2, 9, 40, 8)
    mask = Causal(25)
    logits = (0.3 * q @ k.mT).masked_fill(~mask.allowed(9, 40), -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    cols = attention_column_sq_norms(q, k, 0.3, mask=mask, memory_bytes=3000)
    assert torch.allclose(cols, probs.square().sum(-2), rtol=0, atol=1e-12)
    assert (cols[..., 34:] == 0).all()  # keys after the last query's position: no weight
    sigma = attention_spectral_norm(q, k, 0.3, mask=mask, iterations=500, tol=1e-13)
    assert torch.allclose(sigma, torch.linalg.matrix_norm(probs, ord=2), rtol=1e-8)


def test_chunk_size_respects_memory_budget():
    assert chunk_rows(1, 65536, 256 * 2**20) * 3 * 8 * 65536 <= 256 * 2**20
    assert chunk_rows(8, 10**9, 1) == 1


def test_reference_survives_logits_that_overflow_naively():
    q, k, v = make_qkv(1, 1, 47, 47, 21, spread=40.0)
    assert (q @ k.transpose(-1, -2)).max() > 800  # exp would overflow float64
    out = exact_attention(q, k, v, 1.0)
    assert torch.isfinite(out).all()


def test_column_norms_and_spectral_norm_match_dense_computation():
    q, k, v = make_qkv(2, 2, 59, 97, 21)
    p = torch.softmax(0.3 * q @ k.transpose(-1, -2), dim=-1)
    cols = attention_column_sq_norms(q, k, 0.3, memory_bytes=5000)
    assert torch.allclose(cols, p.square().sum(-2), rtol=1e-12, atol=0)
    sigma = attention_spectral_norm(q, k, 0.3, iterations=500, tol=1e-12, memory_bytes=5000)
    assert torch.allclose(sigma, torch.linalg.matrix_norm(p, ord=2), rtol=1e-6)


def test_metrics_on_known_answers():
    exact = torch.zeros(1, 1, 4, 2, dtype=torch.float64)
    exact[0, 0, :, 0] = 1.0  # rank one, ‖O‖₂ = 2, ‖O‖_F = 2, every row norm 1
    approx = exact.clone()
    approx[0, 0, 0, 0] = 0.0  # one row entirely wrong
    errors = slice_errors(approx, exact)
    assert errors["rel_frobenius"].item() == pytest.approx(0.5)
    assert errors["rel_spectral"].item() == pytest.approx(0.5)
    assert errors["max_row_rel"].item() == pytest.approx(1.0)
    zero = slice_errors(torch.zeros_like(exact), exact)
    assert all(v.item() == pytest.approx(1.0) for v in zero.values())
    assert slice_errors(exact, exact)["rel_spectral"].item() == 0.0


def test_bound_normalized_uses_given_norms():
    exact = torch.ones(1, 2, 3, 2, dtype=torch.float64)
    approx = exact * 1.5
    errs = slice_errors(
        approx,
        exact,
        attention_norm=torch.full((1, 2), 2.0, dtype=torch.float64),
        value_norm=torch.full((1, 2), 3.0, dtype=torch.float64),
    )
    diff_norm = torch.linalg.matrix_norm(approx - exact, ord=2)
    assert torch.allclose(errs["bound_normalized"], diff_norm / 6.0)


def test_summary_reports_mean_max_and_every_slice():
    s = Summary.of([0.1, 0.3, 0.2, 0.6])
    assert s.mean == pytest.approx(0.3) and s.max == pytest.approx(0.6) and len(s.per_slice) == 4
    assert Summary.of([0.1, math.inf]).mean == math.inf  # a non-finite slice is never averaged away
