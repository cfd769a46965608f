"""The maths of nystromformer: segment means for any n, the Newton–Schulz pseudo-inverse, landmarks
for cross attention.  The exact limit and the error falling with the budget are in the contract
battery."""

import torch

from kdecli.methods import make_method
from kdecli.methods.nystromformer import newton_schulz_pinv, segment_means
from tests.conftest import make_qkv


def test_segment_means_cover_every_row_once_for_any_n():
    x = torch.arange(10, dtype=torch.float64).view(1, 1, 10, 1)
    # segments ⌊i·10/3⌋: rows 0-2, 3-5, 6-9
    assert segment_means(x, 3).flatten().tolist() == [1.0, 4.0, 7.5]
    assert torch.equal(segment_means(x, 10), x)
    assert torch.equal(segment_means(x, 50), x)  # more landmarks than rows: one per row
    y = torch.randn(2, 3, 97, 5, dtype=torch.float64)
    means = segment_means(y, 7)
    sizes = torch.diff(torch.arange(8) * 97 // 7)
    assert sizes.max() - sizes.min() <= 1
    # size-weighted means add back up to the column sums: no row dropped or counted twice
    assert torch.allclose((means * sizes.view(7, 1)).sum(-2), y.sum(-2))


def test_newton_schulz_converges_to_the_pseudo_inverse():
    g = torch.Generator().manual_seed(0)
    square = torch.softmax(torch.randn(3, 16, 16, generator=g, dtype=torch.float64), -1)
    wide = torch.softmax(torch.randn(3, 12, 20, generator=g, dtype=torch.float64), -1)  # m_q != m_k
    for mat in (square, wide):
        z = newton_schulz_pinv(mat, 40)
        assert (z - torch.linalg.pinv(mat)).abs().max() < 1e-8
        assert (mat @ z @ mat - mat).abs().max() < 1e-10  # the Penrose condition M Z M = M
    # six steps (the paper's default) are not yet converged: the option matters
    assert (newton_schulz_pinv(square, 6) - torch.linalg.pinv(square)).abs().max() > 1e-3


def test_cross_attention_landmarks_come_from_each_side():
    q, k, v = make_qkv(1, 2, 40, 90, 21, 13)
    # 60 landmarks: Q̃ is all 40 queries, K̃ has 60 segment means of K; M is 40 × 60
    out = make_method("nystromformer", 60, pinv="exact")(q, k, v, scale=0.3)
    assert out.shape == (1, 2, 40, 13) and torch.isfinite(out).all()
