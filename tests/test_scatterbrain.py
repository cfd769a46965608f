"""The maths of scatterbrain: exact band + Performer elsewhere, the band alone, finite.

The exact limit and the error falling with the budget are in the contract battery."""

import pytest
import torch

from kdecli.measure.reference import exact_attention
from kdecli.methods import make_method
from kdecli.methods.features import log_features, random_directions, split_scale
from tests.conftest import anti_aligned_inputs, gen, make_qkv, mean_error


def dense_scatterbrain(q, k, v, scale, local_context, features, seed, offset=0, row_sums=False):
    """The n_q × n_k matrix written out: e^ℓ on the band |j − p_i| < w/2, p_i = offset +
    ⌊i·n_k/n_q⌋, the unshifted Performer estimate φ(q_i)·φ(k_j) (same directions, same
    generator) everywhere else.  ``row_sums``: also the estimated row sums."""
    b, h, n_q, d = q.shape
    n_k = k.shape[-2]
    omega = random_directions(
        b, h, d, features, orthogonal=True, generator=gen(seed), device=q.device, dtype=q.dtype
    )
    q1, k1 = split_scale(q, k, scale)
    phi_q, phi_k = torch.exp(log_features(q1, omega)), torch.exp(log_features(k1, omega))
    low_rank = phi_q @ phi_k.transpose(-1, -2) / features
    position = offset + torch.arange(n_q) * n_k // n_q
    band = (torch.arange(n_k).view(1, -1) - position.view(-1, 1)).abs() < local_context / 2
    a = torch.where(band, torch.exp(scale * q @ k.transpose(-1, -2)), low_rank)
    out = (a @ v) / a.sum(-1, keepdim=True)
    return (out, a.sum(-1)) if row_sums else out


@pytest.mark.parametrize(
    "n_q,n_k,w", [(97, 97, 10), (47, 97, 9), (1025, 97, 33), (97, 1025, 64), (97, 97, 1), (3, 1, 1)]
)
def test_band_is_exact_and_the_rest_is_the_performer_estimate(n_q, n_k, w):
    """Against the dense matrix: checks the band's placement (also for n_q != n_k and odd w), the
    subtraction S = e^ℓ − φφᵀ on it, and that the two shifted parts are merged consistently."""
    q, k, v = make_qkv(1, 2, n_q, n_k, 21, 13, spread=0.7)
    method = make_method("scatterbrain", None, local_context=w, features=32)
    out = method(q, k, v, scale=0.3, generator=gen(3))
    ref = dense_scatterbrain(q, k, v, 0.3, w, 32, seed=3)
    assert (out - ref).abs().max() <= 1e-10
    assert w > 1 or n_k == 1 or (out - exact_attention(q, k, v, 0.3)).abs().max() > 1e-3


@pytest.mark.parametrize("w", [1, 9, 40, 200])
def test_a_causal_full_block_keeps_the_band_at_absolute_positions(w):
    """In the causal decomposition a full block's queries sit after its keys (offset = 48 here):
    the band must hold the keys within w/2 *before* each query, and the row sums returned for the
    merge must be the estimate's own (Â1 + S1)."""
    q, k, v = make_qkv(1, 2, 48, 48, 21, 13, spread=0.7)
    method = make_method("scatterbrain", None, local_context=w, features=32)
    lse, out = method.partial(q, k, v, 0.3, gen(3), 48)
    ref, sums = dense_scatterbrain(q, k, v, 0.3, w, 32, seed=3, offset=48, row_sums=True)
    assert (out - ref).abs().max() <= 1e-10
    assert (lse - sums.log()).abs().max() <= 1e-10


def test_error_falls_as_the_band_widens_at_fixed_features():
    """The battery grows band and features together; here the band alone must pay off."""
    q, k, v = make_qkv(1, 2, 257, 257, 16, spread=0.8)
    ref = exact_attention(q, k, v, 0.25)
    errors = [
        mean_error(
            make_method("scatterbrain", None, local_context=w, features=32),
            q,
            k,
            v,
            0.25,
            ref,
            range(4),
            metric="rel_frobenius",
        )
        for w in (4, 64, 256)
    ]
    assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("same_qk", [False, True])
def test_logits_of_several_hundred_stay_finite(dtype, same_qk):
    """Large logits make the band and the features live at very different scales (e^{hundreds}
    apart), so a wrong shared shift overflows or leaves 0/0."""
    q, k, v = make_qkv(1, 2, 97, 97, 21, 13, dtype=dtype, spread=12.0)
    k = q if same_qk else k
    assert (21**-0.5 * q.double() @ k.double().transpose(-1, -2)).abs().max() > 300
    out = make_method("scatterbrain", 32)(q, k, v, scale=21**-0.5, generator=gen(0))
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    # Where a query's band logits beat all its off-band logits by 10 or more, the band holds all
    # but e^-10 of the mass and the estimate must agree with exact attention there.  A wrongly
    # scaled low-rank part (or a shift that flushed the band) would not.
    logits = 21**-0.5 * q.double() @ k.double().transpose(-1, -2)
    band = (torch.arange(97).view(1, -1) - torch.arange(97).view(-1, 1)).abs() < 8  # w = 16
    best_on = logits.masked_fill(~band, -torch.inf).amax(-1)
    margin = best_on - logits.masked_fill(band, -torch.inf).amax(-1)
    clear = margin > 10
    assert clear.sum() > 20, "the test needs queries whose band dominates"
    error = (out.double() - exact_attention(q, k, v, 21**-0.5)).abs().amax(-1)
    assert error[clear].max() < 0.01, error[clear]


def test_queries_opposite_a_key_cluster_stay_finite():
    """Logits around −500 to −1000: band and low-rank parts live e^{hundreds} apart."""
    q, k, v = (x.float() for x in anti_aligned_inputs())
    assert (21**-0.5 * q @ k.transpose(-1, -2)).max() < -500
    out = make_method("scatterbrain", 16)(q, k, v, scale=21**-0.5, generator=gen(0))
    assert torch.isfinite(out).all()
