"""Pure error functions, one value per batch×head slice.

For a slice with exact output O and estimate Õ (both n_q × d_v):
  rel_spectral     = ‖Õ − O‖₂ / ‖O‖₂          (largest singular value; the KDEformer paper's metric)
  rel_frobenius    = ‖Õ − O‖_F / ‖O‖_F
  max_row_rel      = max_i ‖Õ_i − O_i‖₂ / ‖O_i‖₂   (the worst query)
  bound_normalized = ‖Õ − O‖₂ / (‖D⁻¹A‖₂ ‖V‖₂)   (what KDEformer's theorem bounds by ε)
All computed in float64.  Outputs of zeros score exactly 1 on the three relative norms.
"""

from __future__ import annotations

import torch

METRICS = ("rel_spectral", "rel_frobenius", "max_row_rel", "bound_normalized")


def spectral_norm(x: torch.Tensor) -> torch.Tensor:
    """Largest singular value of each trailing matrix: (…, n, d) -> (…)."""
    return torch.linalg.matrix_norm(x.to(torch.float64), ord=2)


def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # 0/0 (an all-zero exact output approximated exactly) is no error; x/0 with x > 0 is infinite.
    safe = torch.where(den > 0, den, torch.ones_like(den))
    out = num / safe
    return torch.where(
        den > 0, out, torch.where(num > 0, torch.full_like(num, float("inf")), num * 0)
    )


def slice_errors(
    approx: torch.Tensor,
    exact: torch.Tensor,
    *,
    attention_norm: torch.Tensor | None = None,
    value_norm: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Errors of ``approx`` against ``exact`` (b, h, n_q, d_v) per slice: {metric: (b, h)}.

    ``bound_normalized`` is included only when ‖D⁻¹A‖₂ (``attention_norm``) and ‖V‖₂
    (``value_norm``), each (b, h), are given.
    """
    exact = exact.to(torch.float64)
    diff = approx.to(torch.float64) - exact
    diff_spectral = spectral_norm(diff)
    row_err = diff.norm(dim=-1)
    errors = {
        "rel_spectral": ratio(diff_spectral, spectral_norm(exact)),
        "rel_frobenius": ratio(diff.flatten(-2).norm(dim=-1), exact.flatten(-2).norm(dim=-1)),
        "max_row_rel": ratio(row_err, exact.norm(dim=-1)).amax(dim=-1),
    }
    if attention_norm is not None and value_norm is not None:
        errors["bound_normalized"] = ratio(diff_spectral, attention_norm * value_norm)
    return errors
