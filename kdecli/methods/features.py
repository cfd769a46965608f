"""Positive random features of the exponential kernel (FAVOR+): performer and scatterbrain.

Choromanski et al., "Rethinking Attention with Performers", ICLR 2021.  Write the logit as
ℓ = s·q·k = q'·k' with q' = sign(s)·√|s|·q and k' = √|s|·k.  With directions ω_1..ω_m, each
N(0, I_d),

    φ(x)_r = exp(ω_r·x − ‖x‖²/2) / √m,          E[φ(q')·φ(k')] = e^{q'·k'} = e^{ℓ}

and every feature is positive, so every estimated attention weight is positive too.

Orthogonal directions (the default) stack blocks of d×d Haar-orthogonal matrices, each row rescaled
to the length of an independent Gaussian vector (chi with d degrees of freedom).  Each ω_r is then
still exactly N(0, I_d), so the estimate stays unbiased, while the rows of one block are exactly
orthogonal, which lowers its variance.  ``orthogonal=False`` draws i.i.d. Gaussian rows.

Stabilisation.  exp of raw features overflows for logits in the hundreds, so features are built from
their logs f_ir = ω_r·q'_i − ‖q'_i‖²/2 and g_jr = ω_r·k'_j − ‖k'_j‖²/2, shifted before the exp:

    keys     kf_jr = exp(g_jr − β_r),         β_r = max_j g_jr           (per feature, over keys)
    queries  qf_ir = exp(f_ir + β_r − γ_i),   γ_i = max_r (f_ir + β_r)   (per query, over features)

so that φ(q_i)·φ(k_j) = exp(γ_i − log m) · qf_i·kf_j exactly.  Every entry lies in (0, 1], nothing
overflows, and Σ_j qf_i·kf_j ≥ 1 (the feature r attaining γ_i meets the key attaining β_r with
weight 1·1), so a row sum never underflows to 0.  The per-query shift cancels in each row's ratio.

This departs from the Performer code, which subtracts one global max over all
keys and features.  That is no cheaper and can fail: when a query's strongest features are the
keys' weakest (queries opposite a cluster of keys, logits around −500), every product underflows
in float32 and the row is 0/0.  A max per feature removes that case
(tests/test_performer.py::test_row_sums_cannot_underflow_with_one_shift_per_feature).
"""

from __future__ import annotations

import math

import torch


def split_scale(
    q: torch.Tensor, k: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q', k') with q'·k' = s·q·k; works for any sign of s (s = 0 gives all-zero logits)."""
    return scaled_queries(q, scale), scaled_keys(k, scale)


def scaled_queries(q: torch.Tensor, scale: float) -> torch.Tensor:
    """q' = sign(s)·√|s|·q, the queries' half of ``split_scale``."""
    return q * math.copysign(math.sqrt(abs(scale)), scale)


def scaled_keys(k: torch.Tensor, scale: float) -> torch.Tensor:
    """k' = √|s|·k, the keys' half of ``split_scale`` (a decode cache scales its keys once)."""
    return k * math.sqrt(abs(scale))


def random_directions(
    b: int,
    h: int,
    d: int,
    m: int,
    *,
    orthogonal: bool,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """m directions per batch×head slice, (b, h, m, d), each row distributed as N(0, I_d).

    Drawn in float32 whatever ``dtype`` is, so one seed gives the same directions in every dtype.
    """
    if not orthogonal:
        w = torch.randn(b, h, m, d, generator=generator, device=device, dtype=torch.float32)
        return w.to(dtype)
    blocks = -(-m // d)
    draw = dict(generator=generator, device=device, dtype=torch.float32)
    gauss = torch.randn(b, h, blocks, d, d, **draw)
    lengths = torch.randn(b, h, blocks, d, d, **draw)
    qmat, rmat = torch.linalg.qr(gauss)
    # Fixing the signs of diag(R) makes Q exactly Haar-distributed (LAPACK's Q alone is not).
    qmat = qmat * torch.sign(torch.diagonal(rmat, dim1=-2, dim2=-1)).unsqueeze(-2)
    rows = qmat.transpose(-1, -2) * lengths.norm(dim=-1, keepdim=True)  # rows scaled by chi(d)
    return rows.reshape(b, h, blocks * d, d)[:, :, :m].to(dtype)


def log_features(x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """log(√m·φ(x)) = ω_r·x − ‖x‖²/2 for every row of x (b, h, n, d) and direction: (b, h, n, m)."""
    return torch.einsum("bhnd,bhmd->bhnm", x, omega) - 0.5 * x.square().sum(-1, keepdim=True)


def stabilised_features(
    log_q: torch.Tensor, log_k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qf, kf, log_shift) of the module docstring: φ(q_i)·φ(k_j) = exp(log_shift_i)·qf_i·kf_j.

    ``log_k`` holds the keys that the features will be summed over (all of them, or a prefix).
    """
    beta = log_k.amax(dim=-2, keepdim=True)  # (b, h, 1, m)
    kf = torch.exp(log_k - beta)
    shifted = log_q + beta
    gamma = shifted.amax(dim=-1, keepdim=True)  # (b, h, n_q, 1)
    qf = torch.exp(shifted - gamma)
    return qf, kf, gamma.squeeze(-1) - math.log(log_q.shape[-1])


def favor_features(
    q: torch.Tensor, k: torch.Tensor, scale: float, omega: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stabilised features of q (b, h, n_q, d) and k (b, h, n_k, d) for directions omega."""
    q1, k1 = split_scale(q, k, scale)
    return stabilised_features(log_features(q1, omega), log_features(k1, omega))
