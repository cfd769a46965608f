"""The floors: the errors of the two answers that need no attention at all.

``mean``: every query gets the mean of the values it may see (the ``mean`` baseline; under
``Causal(offset)`` query i gets the mean of v_0 … v_{offset+i}, docs/metrics.md); ``zero``:
every output is zero (relative errors of 1).  A method whose error is not below the mean floor
has learned nothing about the input.  Under a row-sampled reference the floors are measured on
the same rows as every method.
"""

from __future__ import annotations

import torch

from kdecli.masks import Mask
from kdecli.measure.figures import Floors
from kdecli.measure.target import Target
from kdecli.methods import method_of_role


def floors(target: Target, v64: torch.Tensor, mask: Mask) -> Floors:
    """Errors of the two trivial answers against ``target`` (``v64``: the values in float64)."""
    baseline = method_of_role("baseline")()
    queries = v64.new_zeros(*v64.shape[:-2], target.n_q, 1)  # the baseline reads no query
    mean_out = baseline(queries, v64, v64, mask=mask)
    return Floors(mean=target.errors(mean_out), zero=target.errors(torch.zeros_like(mean_out)))
