"""Error past the exact reference's reach: exact rows for a seeded sample of queries (docs/metrics.md).

``--reference`` is ``full`` (every query's exact output), ``rows:R`` or ``auto``.  Under ``rows:R``
one set S of R query indices is drawn without replacement from a ``torch.Generator`` seeded from
the run seed; the same S serves every batch×head slice, every method, every seed and the floors, so
all of them are compared on the same queries.  Their exact float64 outputs cost R·n_k·(d + d_v)
multiply-adds per slice, in the same memory-bounded query chunks as the full reference (under
``Causal(offset)`` a sampled row i keeps its own position offset + i and sees keys j ≤ offset + i).  With e_i = ‖Õ_i − O_i‖² and o_i = ‖O_i‖², per slice:

    rel_frobenius ≈ r̂ = √(Σ_{i∈S} e_i / Σ_{i∈S} o_i)

a ratio estimator of ‖Õ − O‖_F / ‖O‖_F: consistent as R grows, biased by O(1/R) for small R.  Its
95 % interval is a percentile bootstrap over the R rows: B = ``BOOTSTRAP_DRAWS`` resamples of S with
replacement, each a multiplicity vector w_b (Σ_i w_bi = R), give r̂_b = √(Σ w_bi e_i / Σ w_bi o_i);
the interval is the 2.5 % and 97.5 % quantiles of r̂_1 … r̂_B.  The resamples are one seeded (B, R)
matrix W, so r̂_b = √((e W ᵀ)_b / (o Wᵀ)_b) for every slice at once, and every method and seed is
resampled alike.  The interval of the mean over slices is the quantiles of the per-draw mean over
slices (the slices share S, so rows are resampled jointly).  Resampling with replacement ignores the
finite-population correction (1 − R/n_q), which only widens the interval.

``max_row_rel`` over S is a lower bound of the maximum over all queries.  ``rel_spectral`` and
``bound_normalized`` are operator norms of the whole error matrix, which no row sample bounds: they
are not available under ``rows``.

``auto`` is ``full`` while the full reference's estimated cost fits ``FULL_REFERENCE_LIMIT``, else
``rows:AUTO_ROWS``; ``rows:R`` with R ≥ n_q is ``full``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from kdecli.errors import UsageError
from kdecli.masks import FULL, Mask
from kdecli.measure.metrics import ratio
from kdecli.measure.reference import exact_attention

AUTO_ROWS = 4096
# The exact float64 reference on a 2-core CPU (torch 2.13, AMD EPYC) costs about 17 ns per logit
# for the softmax (max, exp, sum, divide over an n_k-wide row) plus 0.055 ns per multiply-add of
# QKᵀ and PV: the softmax weighs as much as ~320 multiply-adds per logit, more than d + d_v at the
# usual d.  So the estimate counts b·h·n_q·n_k·(d + d_v + SOFTMAX_MACS_PER_LOGIT) multiply-adds,
# and the limit is what takes about a minute there: n = 16,384 at d = 64 is 1.2e11 (7 s, full);
# n = 49,152 is 1.1e12 (about a minute: rows); n = 131,072 would take about seven minutes.
SOFTMAX_MACS_PER_LOGIT = 320
FULL_REFERENCE_LIMIT = 1e12
BOOTSTRAP_DRAWS = 1000
LEVEL = 0.95
SPECS = "full, rows:R (R a positive integer) or auto"

# The sampled rows' logits held at once.  Wider than the full reference's 256 MiB on purpose: at
# n_k = 2^20 that bound leaves 10 rows per chunk, and the skinny products ran at half speed (rows:4096
# took 168 s there; with 1 GiB about 95 s).  Row samples are used exactly when n_k is large.
ROW_MEMORY_BYTES = 2**30


@dataclass(frozen=True)
class ReferenceSpec:
    """``full``, ``rows`` (with ``rows`` = R) or ``auto``: what ``--reference`` asks for."""

    mode: str
    rows: int | None = None

    def __str__(self) -> str:
        return f"rows:{self.rows}" if self.mode == "rows" else self.mode


def parse_reference(spec: str | ReferenceSpec) -> ReferenceSpec:
    """``"full"``, ``"auto"`` or ``"rows:R"`` -> ``ReferenceSpec``; a UsageError otherwise."""
    if isinstance(spec, ReferenceSpec):
        return spec
    text = spec.strip().lower() if isinstance(spec, str) else spec
    if text in ("full", "auto"):
        return ReferenceSpec(text)
    if isinstance(text, str) and text.startswith("rows:"):
        count = text.removeprefix("rows:").strip()
        if count.isdigit() and int(count) >= 1:
            return ReferenceSpec("rows", int(count))
    raise UsageError(f"--reference must be {SPECS}; got {spec!r}.")


def full_reference_cost(shape: Mapping[str, int]) -> float:
    """Multiply-add equivalents of the full float64 reference: b·h·n_q·n_k·(d + d_v + softmax)."""
    per_logit = shape["d"] + shape["d_v"] + SOFTMAX_MACS_PER_LOGIT
    return float(shape["b"] * shape["h"] * shape["n_q"] * shape["n_k"] * per_logit)


def resolve_reference(spec: str | ReferenceSpec, shape: Mapping[str, int]) -> ReferenceSpec:
    """The reference a run uses on inputs of ``shape`` (keys b, h, n_q, n_k, d, d_v): ``full``,
    or ``rows`` with R < n_q (a sample as large as the queries is the full reference)."""
    spec = parse_reference(spec)
    if spec.mode == "auto":
        if full_reference_cost(shape) <= FULL_REFERENCE_LIMIT:
            return ReferenceSpec("full")
        spec = ReferenceSpec("rows", AUTO_ROWS)
    if spec.mode == "rows" and spec.rows >= shape["n_q"]:
        return ReferenceSpec("full")
    return spec


def draw_rows(n_q: int, count: int, seed: int) -> torch.Tensor:
    """``count`` distinct query indices in [0, n_q), sorted, from a CPU generator seeded ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_q, generator=generator)[:count].sort().values


def bootstrap_weights(count: int, draws: int, seed: int) -> torch.Tensor:
    """(draws, count) float64 multiplicities: row b counts how often each of the ``count`` rows
    appears in the b-th resample with replacement (each row of the matrix sums to ``count``)."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(count, (draws, count), generator=generator)
    weights = torch.zeros(draws, count, dtype=torch.float64)
    return weights.scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float64))


@dataclass(frozen=True)
class RowEstimate:
    """The errors a row sample allows, per slice (b, h), and the interval of their slice-mean."""

    rel_frobenius: torch.Tensor  # the ratio estimate r̂
    low: torch.Tensor  # its interval, per slice
    high: torch.Tensor
    mean_low: float  # the interval of the mean of r̂ over slices
    mean_high: float
    max_row_rel: torch.Tensor  # the max over the sampled rows: a lower bound


@dataclass(frozen=True)
class RowSample:
    """The sampled rows, their exact outputs and the bootstrap resamples shared by every method."""

    rows: torch.Tensor  # (R,) sorted query indices, the same in every slice
    exact: torch.Tensor  # (b, h, R, d_v) float64
    weights: torch.Tensor  # (B, R) bootstrap multiplicities
    n_q: int
    seed: int

    @property
    def count(self) -> int:
        return self.rows.numel()

    def take(self, out: torch.Tensor) -> torch.Tensor:
        """A full (b, h, n_q, d_v) output's sampled rows."""
        return out.index_select(-2, self.rows.to(out.device))

    def estimate(self, out: torch.Tensor) -> RowEstimate:
        """The errors of a full output ``out`` (b, h, n_q, d_v) on the sampled rows."""
        exact = self.exact
        diff = self.take(out).to(torch.float64) - exact
        err, ref = diff.square().sum(-1), exact.square().sum(-1)  # e_i, o_i: (b, h, R)
        weights = self.weights.to(exact.device)
        draws = ratio(err @ weights.T, ref @ weights.T).sqrt()  # r̂_b: (b, h, B)
        levels = torch.tensor([(1 - LEVEL) / 2, (1 + LEVEL) / 2], dtype=torch.float64)
        low, high = torch.quantile(draws, levels.to(draws.device), dim=-1)
        mean_low, mean_high = torch.quantile(draws.mean((0, 1)), levels.to(draws.device))
        return RowEstimate(
            rel_frobenius=ratio(err.sum(-1), ref.sum(-1)).sqrt(),
            low=low,
            high=high,
            mean_low=float(mean_low),
            mean_high=float(mean_high),
            max_row_rel=ratio(err.sqrt(), ref.sqrt()).amax(-1),
        )


def sample_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    count: int,
    seed: int,
    *,
    mask: Mask = FULL,
    draws: int = BOOTSTRAP_DRAWS,
    memory_bytes: int = ROW_MEMORY_BYTES,
) -> RowSample:
    """Draw ``count`` query rows (seeded ``seed``) and compute their exact float64 outputs.

    Cost R·n_k·(d + d_v) per slice, in query chunks of at most ``memory_bytes`` of logits; under
    ``mask`` a row keeps its own position, so row i sees keys j ≤ offset + i as in the full
    reference.
    """
    n_q = q.shape[-2]
    rows = draw_rows(n_q, count, seed)
    exact = exact_attention(
        q.index_select(-2, rows.to(q.device)), k, v, scale,
        mask=mask, memory_bytes=memory_bytes, positions=rows,
    )  # fmt: skip
    # the bootstrap's own stream: a different seed from the rows', so the two draws are unrelated
    weights = bootstrap_weights(count, draws, seed + 1)
    return RowSample(rows.to(q.device), exact, weights, n_q, seed)
