"""What every output is measured against: the exact float64 output, and the errors against it.

Under ``--reference full`` the target is the exact output of every query (``kdecli.measure.
reference``), and with ``bound`` also ‖D⁻¹A‖₂ and ‖V‖₂ per slice for ``bound_normalized``; under
``rows:R`` it is the exact output of R seeded query rows (``kdecli.measure.row_reference``), whose
errors are estimates with intervals.  The same target measures every method, every seed and the
floors, so all of them are compared on the same rows.  ``errors(out)`` turns one output into one
``Summary`` per metric (over batch×head slices).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kdecli.masks import Mask
from kdecli.measure.figures import Interval, ReferenceInfo, Summary
from kdecli.measure.metrics import slice_errors, spectral_norm
from kdecli.measure.reference import attention_spectral_norm, exact_attention
from kdecli.measure.row_reference import (
    BOOTSTRAP_DRAWS,
    LEVEL,
    RowEstimate,
    RowSample,
    sample_rows,
)
from kdecli.measure.seeds import ROWS_SEED_NAME, derive_seed
from kdecli.qkv import QKV

# Why a row sample leaves a metric out (the record's ``note``).
NOT_UNDER_ROWS = {
    "rel_spectral": "not available under a row-sampled reference: ‖Õ − O‖₂ is an operator norm "
    "of the whole error matrix, which no sample of its rows bounds (--reference full measures it)",
    "bound_normalized": "not available under a row-sampled reference: it needs ‖Õ − O‖₂ and "
    "‖D⁻¹A‖₂ of every row (--reference full measures it)",
}


@dataclass(frozen=True)
class Target:
    """The exact float64 output of every query, or of a row sample (``RowSample``), and for
    ``bound_normalized`` the pair (‖D⁻¹A‖₂, ‖V‖₂)."""

    exact: torch.Tensor | RowSample
    norms: tuple[torch.Tensor, torch.Tensor] | None = None
    bound: bool = False  # bound_normalized was asked for

    @classmethod
    def compute(
        cls, inputs: QKV, scale: float, mask: Mask, rows: int | None, run_seed: int, bound: bool
    ) -> Target:
        """Every row (``rows`` None), or ``rows`` query rows drawn with a seed derived from
        ``run_seed``; ``inputs`` in float64 on the measuring device."""
        q, k, v = inputs.q, inputs.k, inputs.v
        if rows is not None:
            seed = derive_seed(run_seed, ROWS_SEED_NAME)
            sample = sample_rows(q, k, v, scale, rows, seed, mask=mask)
            return cls(sample, bound=bound)
        norms = None
        if bound:
            norms = (
                attention_spectral_norm(q, k, scale, mask=mask),
                spectral_norm(v),
            )
        exact = exact_attention(q, k, v, scale, mask=mask)
        return cls(exact, norms, bound)

    @property
    def n_q(self) -> int:
        """The queries of a full output (all of them, under a row sample too)."""
        return self.exact.n_q if isinstance(self.exact, RowSample) else self.exact.shape[-2]

    def info(self, requested: str, run_seed: int) -> ReferenceInfo:
        """What the report says of the reference: ``full``, or the rows, seed and interval."""
        if not isinstance(self.exact, RowSample):
            return ReferenceInfo("full", requested=requested)
        rows = self.exact.count
        return ReferenceInfo("rows", rows, run_seed, requested, "bootstrap", BOOTSTRAP_DRAWS, LEVEL)

    def errors(self, out: torch.Tensor) -> dict[str, Summary]:
        """The errors of a full output (b, h, n_q, d_v), one ``Summary`` per metric."""
        if not isinstance(self.exact, RowSample):
            kwargs = {}
            if self.norms is not None:
                kwargs = {"attention_norm": self.norms[0], "value_norm": self.norms[1]}
            return summaries(slice_errors(out, self.exact, **kwargs))
        errors = row_summaries(self.exact.estimate(out))
        if self.bound:
            errors["bound_normalized"] = Summary.unavailable(NOT_UNDER_ROWS["bound_normalized"])
        return errors


def summaries(errors: dict[str, torch.Tensor]) -> dict[str, Summary]:
    """Per-slice errors {metric: (b, h)} as records."""
    return {name: Summary.of(values.reshape(-1).tolist()) for name, values in errors.items()}


def row_summaries(estimate: RowEstimate) -> dict[str, Summary]:
    """A row sample's estimates as records: rel_frobenius with its interval (of the slice-mean and
    of each slice), max_row_rel as a lower bound, rel_spectral absent with the reason."""
    frobenius = Summary.of(estimate.rel_frobenius.reshape(-1).tolist())
    interval = Interval(
        estimate.mean_low,
        estimate.mean_high,
        tuple(estimate.low.reshape(-1).tolist()),
        tuple(estimate.high.reshape(-1).tolist()),
        LEVEL,
    )
    worst = Summary.of(estimate.max_row_rel.reshape(-1).tolist())
    return {
        "rel_spectral": Summary.unavailable(NOT_UNDER_ROWS["rel_spectral"]),
        "rel_frobenius": replace(frobenius, interval=interval),
        "max_row_rel": replace(worst, lower_bound=True),
    }
