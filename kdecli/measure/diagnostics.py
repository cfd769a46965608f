"""Why an estimate is wrong: the keys a method read, the attention they carry, and the split of
its error into what the choice of keys costs and what its estimator adds (docs/metrics.md).

For a method that reads a key set S_i per query (``AttentionMethod.key_sets``,
``kdecli.methods.keysets``), with ℓ_ij = s·q_i·k_j over the A_i keys the mask allows query i,
P = D⁻¹A the exact float64 attention, O = PV the exact output and Õ the method's, per batch×head
slice:

    density          = mean_i |S_i| / |A_i|          (from the sets used, never the budget)
    mass_recall      = mean_i Σ_{j∈S_i} P_ij         (1 for a lossless choice of keys)
    O^S_i            = Σ_{j∈S_i} e^{ℓ_ij} v_j / Σ_{j∈S_i} e^{ℓ_ij}   (exact attention over S_i)
    selection_error  = ‖O^S − O‖ / ‖O‖               (what the choice of keys costs)
    estimation_error = ‖Õ − O^S‖ / ‖O‖               (what the estimator adds over its keys)
    lse_error        = mean_i |log D̃_i − log D_i|,   D_i = Σ_{j∈A_i} e^{ℓ_ij}

each split in the norms of the errors (``rel_spectral``, ``rel_frobenius``), so that by the
triangle inequality selection + estimation ≥ the total error.  A method exact over its sets
(``KeySets.exact_over_set``) has estimation error 0 up to rounding.  D̃_i is the method's own
row-sum estimate (``log_row_sums``), else for a method exact over its sets the set's own,
Σ_{j∈S_i} e^{ℓ_ij}; a method that returns row sums but no sets gets ``lse_error`` alone.

A second pass after the measured call: ``key_sets`` and ``log_row_sums`` are called with a
generator seeded as the forward's (``kdecli.measure.seeds``), so their draws are the call's; the
exact side comes from the float64 inputs in query chunks (the sets are handed out by chunks: no
n_q × n_k matrix is held whole).  Under a row-sampled reference only the sampled rows are
evaluated: density, mass_recall and lse_error are means over rows, estimated by their means on the
sample; the split in rel_frobenius is a ratio estimate on the sample; rel_spectral's split is an
operator norm of every row, so it is absent with a note, as the errors' is.

The figures are a ``Diagnostics`` record (``kdecli.measure.figures``).  A method without sets
gets null figures and its ``key_set_note``; a failure here leaves the call's errors standing,
and the record's note says what failed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kdecli.errors import first_line
from kdecli.masks import Mask
from kdecli.measure.figures import DIAGNOSTIC_FIGURES, Diagnostics, Summary
from kdecli.measure.metrics import ratio, spectral_norm
from kdecli.measure.reference import DEFAULT_MEMORY_BYTES, chunk_rows
from kdecli.measure.row_reference import RowSample
from kdecli.measure.seeds import generator
from kdecli.methods.base import AttentionMethod
from kdecli.methods.keysets import KeySets
from kdecli.qkv import QKV

FIGURES = DIAGNOSTIC_FIGURES  # the names of the figures, in the record's order
SPECTRAL_UNDER_ROWS = (
    "not available under a row-sampled reference: the split in rel_spectral is an operator norm of "
    "every row (--reference full measures it); rel_frobenius's is a ratio estimate on the rows"
)
NO_ROW_SUM = "no lse_error: the method returns no row-sum estimate and is not exact over its sets"


@dataclass(frozen=True)
class RowFigures:
    """What the exact pass gives per evaluated row (b, h, R): the float64 log row sums, and with
    sets their density, mass recall, the set's log row sum and the exact output over the set."""

    log_sums: torch.Tensor
    density: torch.Tensor | None = None
    recall: torch.Tensor | None = None
    set_log_sums: torch.Tensor | None = None
    over_set: torch.Tensor | None = None  # O^S: (b, h, R, d_v)


def diagnose(
    method: AttentionMethod,
    work: QKV,
    exact_inputs: QKV,
    reference: torch.Tensor | RowSample,
    out: torch.Tensor,
    scale: float,
    mask: Mask,
    run_seed: int,
    prompt: torch.Tensor | None = None,
    shared: SharedAttention | None = None,
) -> Diagnostics:
    """The diagnostics of ``out``, the call ``method(work.q, work.k, work.v, ...)`` made with the
    generator of ``run_seed``, against ``reference`` (every row's exact output, or a row sample)
    computed from ``exact_inputs`` (the float64 inputs).  A method that ``needs_prompt_queries``
    ran as decode steps over a cache prepared with ``prompt``: its sets are those steps'
    (``decode_key_sets``).  ``shared``: the exact attention of these inputs, kept across the
    calls measured on them.  Never raises: a failure is the note."""
    try:
        with torch.no_grad():
            sets, log_sums = _hooks(method, work, scale, mask, run_seed, prompt)
            return _diagnose(
                method, sets, log_sums, exact_inputs, reference, out, scale, mask, shared
            )
    except Exception as exc:  # a figure beside the errors: never lose them for it
        return Diagnostics(note=f"not computed: {first_line(exc)}")


def _hooks(method, work, scale, mask, run_seed, prompt):
    """The method's key sets and log row sums of the call, each asked with a generator in the
    state the call's started from."""
    q, k, v = work.q, work.k, work.v
    if method.needs_prompt_queries:  # the call was decode steps over a prepared cache
        seeded = generator(q.device, run_seed, method.name)
        cache = method.prepare_cache(k, v, mask=mask, scale=scale, generator=seeded, queries=prompt)
        return method.decode_key_sets(q, cache), None
    sets = method.key_sets(q, k, v, scale, generator(q.device, run_seed, method.name), mask)
    log_sums = method.log_row_sums(q, k, v, scale, generator(q.device, run_seed, method.name), mask)
    return sets, log_sums


def _diagnose(
    method, sets, log_sums, exact_inputs, reference, out, scale, mask, shared
) -> Diagnostics:
    notes = [] if sets is not None else [f"no key set: {method.key_set_note}"]
    if sets is None and log_sums is None:
        return Diagnostics(note=notes[0])
    sampled = isinstance(reference, RowSample)
    n_q = exact_inputs.q.shape[-2]
    rows = reference.rows if sampled else torch.arange(n_q, device=exact_inputs.q.device)
    exact = reference.exact if sampled else reference
    found = exact_rows(exact_inputs, scale, mask, rows, sets, shared=shared)
    if log_sums is not None:
        estimate = log_sums.to(torch.float64).index_select(-1, rows.to(log_sums.device))
    elif sets is not None and sets.exact_over_set:
        estimate = found.set_log_sums
    else:
        estimate = None
        notes.append(NO_ROW_SUM)
    lse = None
    if estimate is not None:
        lse = _summary((estimate.to(found.log_sums.device) - found.log_sums).abs().mean(-1))
    if sampled:
        notes.append(f"on the {rows.numel()} sampled rows of a row-sampled reference")
    note = "; ".join(notes) or None
    if sets is None:
        return Diagnostics(lse_error=lse, note=note)
    approx = (reference.take(out) if sampled else out).to(torch.float64).to(exact.device)
    over_set = found.over_set.to(exact.device)
    return Diagnostics(
        density=_summary(found.density.mean(-1)),
        mass_recall=_summary(found.recall.mean(-1)),
        selection_error=_split(over_set, exact, exact, sampled),
        estimation_error=_split(approx, over_set, exact, sampled),
        lse_error=lse,
        note=note,
    )


def _split(a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor, sampled: bool) -> dict:
    """‖a − b‖ / ‖O‖ per slice, in each norm the reference allows."""
    diff = a - b
    frobenius = ratio(diff.flatten(-2).norm(dim=-1), exact.flatten(-2).norm(dim=-1))
    if sampled:
        spectral = Summary.unavailable(SPECTRAL_UNDER_ROWS)
    else:
        spectral = _summary(ratio(spectral_norm(diff), spectral_norm(exact)))
    return {"rel_spectral": spectral, "rel_frobenius": _summary(frobenius)}


def _summary(per_slice: torch.Tensor) -> Summary:
    return Summary.of(per_slice.reshape(-1).tolist())


def exact_rows(
    inputs: QKV,
    scale: float,
    mask: Mask,
    rows: torch.Tensor,
    sets: KeySets | None,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    shared: SharedAttention | None = None,
) -> RowFigures:
    """The exact side of the diagnostics on the query ``rows`` (sorted indices), from the float64
    ``inputs``: per row its log D_i, and with ``sets`` its density, mass recall, log Σ_{S_i} e^ℓ
    and O^S_i.  In query chunks of at most ``memory_bytes`` of logits, each chunk's sets asked of
    ``sets.rows`` once.  With ``shared`` holding P for these inputs and rows, the figures come
    from it: Σ_{j∈S_i} P_ij is the recall, log D_i + log of it the set's log row sum, and
    Σ_{j∈S_i} P_ij v_j over the recall is O^S_i (no logits, no exponentials)."""
    held = shared.of(inputs, scale, mask, rows) if shared is not None and sets is not None else None
    if held is not None:
        return _from_shared(held, inputs.v, mask, rows, sets, inputs.q.shape[-2], memory_bytes)
    q, k, v = (x.to(torch.float64) for x in (inputs.q, inputs.k, inputs.v))
    b, h, n_q, _ = q.shape
    n_k, d_v = k.shape[-2], v.shape[-1]
    rows = rows.to(q.device)
    count = rows.numel()
    log_sums = torch.empty(b, h, count, dtype=torch.float64, device=q.device)
    if sets is not None:
        density, recall, set_log_sums = (torch.empty_like(log_sums) for _ in range(3))
        over_set = torch.empty(b, h, count, d_v, dtype=torch.float64, device=q.device)
    # a chunk holds two n_k-wide float64 buffers per row (the logits' and the set's, each
    # exponentiated in place), the set's booleans, and what ``sets.rows`` builds to hand them out
    k_t = k.transpose(-1, -2)
    for start, stop, lo, hi in _row_chunks(rows, n_q, chunk_rows(b * h, n_k, memory_bytes // 2)):
        at = rows[lo:hi]
        logits = (q.index_select(-2, at) * scale) @ k_t
        allowed = _allowed_at(mask, at, n_k)  # (R_c, n_k), None: every key
        if allowed is not None:
            logits.masked_fill_(~allowed, float("-inf"))
        if sets is None:
            log_sums[..., lo:hi] = torch.logsumexp(logits, dim=-1)
            continue
        chosen = _chunk_sets(sets, start, stop, at - start, n_k, (b, h))
        if allowed is not None:
            chosen &= allowed
        kept = chosen.sum(-1, dtype=torch.float64)
        visible = n_k if allowed is None else allowed.sum(-1, dtype=torch.float64)
        density[..., lo:hi] = kept / visible
        # two n_k-wide buffers, each exponentiated in place from its own row max: e^{ℓ − max} over
        # the allowed keys, and over the set's (an empty set: all −inf, its sums 0 and log −inf)
        on_set = logits.masked_fill(~chosen, float("-inf"))
        log_d, _ = _exp_sum(logits)
        log_s, set_sums = _exp_sum(on_set)
        log_sums[..., lo:hi] = log_d
        set_log_sums[..., lo:hi] = log_s
        recall[..., lo:hi] = (log_s - log_d).exp()
        safe = torch.where(set_sums > 0, set_sums, 1.0).unsqueeze(-1)
        over_set[..., lo:hi, :] = (on_set @ v) / safe  # an empty set reads nothing: 0
    if sets is None:
        return RowFigures(log_sums)
    return RowFigures(log_sums, density, recall, set_log_sums, over_set)


class SharedAttention:
    """The exact float64 attention of one input's evaluated rows, computed on first use and kept
    for the diagnostics of every method and seed measured on that input: P (b, h, R, n_k), P_ij =
    e^{ℓ_ij} / D_i (0 where the mask forbids), and log D (b, h, R).  Each call would otherwise
    recompute the logits and exponentiate them again.  Held only when P fits in
    ``memory_bytes``; past that, ``of`` is None and each call computes its chunks itself."""

    def __init__(self, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        self.memory_bytes = memory_bytes
        self._asked: tuple | None = None  # (q, k, scale, mask, rows) of what is held
        self._held: tuple[torch.Tensor, torch.Tensor] | None = None

    def of(
        self, inputs: QKV, scale: float, mask: Mask, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(P, log D) of ``inputs`` on ``rows``, or None where P would not fit.  Computed again
        when asked of other tensors (held by reference: the same objects, not equal values),
        another scale, mask or rows."""
        q, k = inputs.q, inputs.k
        b, h, _, _ = q.shape
        if b * h * rows.numel() * k.shape[-2] * 8 > self.memory_bytes:
            return None
        asked = self._asked
        same = (
            asked is not None
            and asked[0] is q
            and asked[1] is k
            and asked[2:4] == (scale, mask)
            and torch.equal(asked[4], rows)
        )
        if not same:
            self._held = None  # free the old P before the new one is computed
            self._held = _attention(inputs, scale, mask, rows)
            self._asked = (q, k, scale, mask, rows.clone())
        return self._held


def _attention(
    inputs: QKV, scale: float, mask: Mask, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """P and log D of ``SharedAttention``, in float64."""
    q, k = (x.to(torch.float64) for x in (inputs.q, inputs.k))
    rows = rows.to(q.device)
    logits = (q.index_select(-2, rows) * scale) @ k.transpose(-1, -2)
    allowed = _allowed_at(mask, rows, k.shape[-2])
    if allowed is not None:
        logits.masked_fill_(~allowed, float("-inf"))
    log_sums, sums = _exp_sum(logits)  # in place: P is the one buffer of its size
    return logits.div_(sums.unsqueeze(-1)), log_sums


def _from_shared(held, v, mask, rows, sets, n_q, memory_bytes) -> RowFigures:
    """``exact_rows``'s figures from the shared P, in the same query chunks."""
    probabilities, log_sums = held
    v = v.to(torch.float64)
    b, h, count, n_k = probabilities.shape
    rows = rows.to(probabilities.device)
    density, recall = torch.empty_like(log_sums), torch.empty_like(log_sums)
    over_set = torch.empty(b, h, count, v.shape[-1], dtype=torch.float64, device=v.device)
    for start, stop, lo, hi in _row_chunks(rows, n_q, chunk_rows(b * h, n_k, memory_bytes // 2)):
        at = rows[lo:hi]
        chosen = _chunk_sets(sets, start, stop, at - start, n_k, (b, h))
        allowed = _allowed_at(mask, at, n_k)
        if allowed is not None:
            chosen &= allowed
        visible = n_k if allowed is None else allowed.sum(-1, dtype=torch.float64)
        density[..., lo:hi] = chosen.sum(-1, dtype=torch.float64) / visible
        on_set = probabilities[..., lo:hi, :] * chosen
        mass = on_set.sum(-1)
        recall[..., lo:hi] = mass
        over_set[..., lo:hi, :] = (on_set @ v) / torch.where(mass > 0, mass, 1.0).unsqueeze(-1)
    return RowFigures(log_sums, density, recall, log_sums + recall.log(), over_set)


def _row_chunks(rows: torch.Tensor, n_q: int, step: int) -> Iterator[tuple[int, int, int, int]]:
    """(start, stop, lo, hi): the query chunks [start, stop) of ``step`` queries that hold an
    evaluated row, ``rows[lo:hi]`` those rows (``rows`` sorted; a row sample skips chunks)."""
    for start in range(0, n_q, step):
        stop = min(n_q, start + step)
        lo, hi = (int(x) for x in torch.searchsorted(rows, rows.new_tensor([start, stop])))
        if lo < hi:
            yield start, stop, lo, hi


def _allowed_at(mask: Mask, at: torch.Tensor, n_k: int) -> torch.Tensor | None:
    """(len(at), n_k) bool: the keys the mask allows the queries ``at``; None under FULL."""
    if not mask.is_causal:
        return None
    return torch.arange(n_k, device=at.device) <= (at + mask.offset).unsqueeze(-1)


def _exp_sum(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log Σ_j e^{ℓ_j} per row, and Σ_j e^{ℓ_j − c} with c the row's max (finite rows), turning
    ``logits`` into e^{ℓ − c} in place."""
    top = logits.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    sums = logits.sub_(top).exp_().sum(-1)
    return top.squeeze(-1) + sums.log(), sums


def _chunk_sets(
    sets: KeySets, start: int, stop: int, local: torch.Tensor, n_k: int, slices: tuple[int, int]
) -> torch.Tensor:
    """The chunk's sets (b, h, rows, n_k) on the evaluated rows ``local``; keys past ``sets.n_k``
    (dropped by the call: no query sees them) are not in any set."""
    chunk = sets.rows(start, stop)
    expected = (*slices, stop - start, sets.n_k)
    if tuple(chunk.shape) != expected:
        raise ValueError(f"key_sets gave rows of shape {tuple(chunk.shape)}; expected {expected}")
    chunk = chunk.to(local.device).index_select(-2, local).bool()
    if sets.n_k < n_k:
        chunk = torch.nn.functional.pad(chunk, (0, n_k - sets.n_k), value=False)
    return chunk[..., :n_k]
