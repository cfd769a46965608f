"""What the KV-cache methods share: where each query sits, and exact softmax over a kept key set.

A KV-cache method (``streaming``, ``quest``, the page oracle ``topk_pages``; ``magicpig`` shares
``query_positions`` only, its candidate sets being random and of any size) picks, per query i, a
set S_i of key positions among those the mask lets it see, and returns

    Õ_i = Σ_{j∈S_i} e^{ℓ_ij − c_i} v_j / Σ_{j∈S_i} e^{ℓ_ij − c_i},   c_i = max_{j∈S_i} ℓ_ij

exactly (renormalised over S_i).  A selection is a ``Selection``: ``index`` (b, h, n_q, m), the
key positions of m *slots* per query, and ``valid`` (same shape, bool), which slots hold a kept
key; an unused slot enters the softmax with logit −inf.  The kept keys are gathered, so a query
pays m products, not n_k.  ``selected_sets`` hands the same selections out as the method's key
sets (``kdecli.methods.keysets``), in ``attend``'s own query chunks.

The methods that choose from the prompt's attention (``h2o``, ``snapkv``) share
``PromptChosen``: decode only, the prompt's queries required, the grouped-query parameters.

Where a query sits (``query_positions``): under ``Causal(offset)`` query i is at key position
offset + i; under ``FULL`` every query sees every key, so each sits at the last key position,
n_k − 1 (that is how a decode step of one query runs: the base class dispatches it as ``FULL``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from kdecli.errors import UsageError
from kdecli.masks import Causal, Mask
from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.common import gather_rows, working_dtype
from kdecli.methods.decode import DecodeCache
from kdecli.methods.keyset_calls import in_forward_chunks, index_rows
from kdecli.methods.keysets import KeySets

# Gathered key elements (queries × slots × d) held at once: the query chunk of ``attend``.
GATHER_ELEMENTS = 2**23


class Selection(NamedTuple):
    """The kept keys of each query: ``index`` (b, h, n_q, m) positions, ``valid`` which slots
    hold one (an invalid slot's position is any in-range index; it weighs nothing)."""

    index: torch.Tensor
    valid: torch.Tensor

    def keys_per_query(self) -> float:
        """The realised |S_i|, averaged over queries and slices: measured from the slots used."""
        return float(self.valid.sum(-1).double().mean())


def query_positions(n_q: int, n_k: int, mask: Mask, device: torch.device) -> torch.Tensor:
    """(n_q,) the key position of each query: offset + i causal, n_k − 1 under ``FULL``."""
    if mask.is_causal:
        return torch.arange(n_q, device=device) + mask.offset
    return torch.full((n_q,), n_k - 1, device=device, dtype=torch.long)


def sinks_and_window(positions: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """|E_p| for each position p: the first ``sinks`` positions and the ``window`` most recent
    ones up to p (its own included), a position in both counted once."""
    return torch.clamp(positions + 1, max=sinks) + torch.clamp(
        positions + 1 - sinks, min=0, max=window
    )


def mean_kept(
    kept: Callable[[torch.Tensor], torch.Tensor], n_q: int, n_k: int, mask: Mask
) -> float:
    """The mean over queries of ``kept(p)``, the keys a query at position p reads: the keys per
    query of a selection whose size depends on the position only."""
    return float(kept(query_positions(n_q, n_k, mask, torch.device("cpu"))).double().mean())


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    slots: int,
    select: Callable[[int, int], Selection],
) -> torch.Tensor:
    """Exact softmax attention of each query over its selected keys, (b, h, n_q, d_v).

    ``select(start, stop)`` returns the ``Selection`` of queries [start, stop), ``slots`` wide;
    the queries run in chunks so that the gathered keys stay under ``GATHER_ELEMENTS`` elements
    (a chunk is one batched product and one softmax; a query's result does not depend on the
    chunking).  Every query must keep at least one key (its own position)."""
    work = working_dtype(q.dtype)
    qw, kw, vw = q.to(work), k.to(work), v.to(work)
    n_q = q.shape[-2]
    step = attend_step(q, v, slots)
    pieces = [
        _attend_chunk(
            qw[..., start : start + step, :] * scale, kw, vw, select(start, min(n_q, start + step))
        )
        for start in range(0, n_q, step)
    ]
    return torch.cat(pieces, dim=-2).to(v.dtype)


def attend_step(q: torch.Tensor, v: torch.Tensor, slots: int) -> int:
    """Queries per chunk of ``attend``: the gathered keys and values under GATHER_ELEMENTS."""
    b, h, _, d = q.shape
    return max(1, GATHER_ELEMENTS // (b * h * max(1, slots) * (d + v.shape[-1])))


def selected_sets(
    q: torch.Tensor, v: torch.Tensor, n_k: int, slots: int, select: Callable[[int, int], Selection]
) -> KeySets:
    """The key sets of ``attend(q, k, v, scale, slots, select)`` over n_k keys: its selections,
    in its own query chunks; the output is exact softmax over each."""
    rows = in_forward_chunks(q.shape[-2], attend_step(q, v, slots), index_rows(n_k, select))
    return KeySets(q.shape[-2], n_k, rows)


def _attend_chunk(q_scaled, k, v, chosen: Selection) -> torch.Tensor:
    b, h, c, m = chosen.index.shape
    flat = chosen.index.reshape(b, h, c * m)
    keys = gather_rows(k, flat).view(b, h, c, m, -1)
    values = gather_rows(v, flat).view(b, h, c, m, -1)
    logits = torch.einsum("bhqd,bhqmd->bhqm", q_scaled, keys)
    logits = logits.masked_fill(~chosen.valid, float("-inf"))
    weights = torch.softmax(logits, dim=-1)  # every query keeps at least its own position
    return torch.einsum("bhqm,bhqmd->bhqd", weights, values)


def prompt_attention(
    queries_scaled: torch.Tensor, k: torch.Tensor, first: int, chunk: int | None = None
) -> torch.Tensor:
    """(b, h, P) the column sums of the exact causal attention of prompt queries over the
    prompt's P keys: query i sits at position first + i and sees the keys j ≤ first + i,

        s_j = Σ_i softmax_j(ℓ_ij : j ≤ first + i)

    (``h2o``'s heavy-hitter scores from every prompt query, ``snapkv``'s vote from its window).
    The queries run in chunks of at most ``GATHER_ELEMENTS`` probabilities, so the prompt's
    P × P matrix is never held whole."""
    b, h, n, _ = queries_scaled.shape
    keys = k.shape[-2]
    total = queries_scaled.new_zeros(b, h, keys)
    step = chunk or max(1, GATHER_ELEMENTS // max(1, b * h * keys))
    key_positions = torch.arange(keys, device=k.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        logits = queries_scaled[..., start:stop, :] @ k.transpose(-1, -2)
        positions = torch.arange(first + start, first + stop, device=k.device).unsqueeze(-1)
        logits = logits.masked_fill(key_positions > positions, float("-inf"))
        total += torch.softmax(logits, dim=-1).sum(-2)
    return total


def group_total(scores: torch.Tensor, group: int) -> torch.Tensor:
    """``scores`` (b, h, …) summed over each group of ``group`` consecutive heads and repeated
    back to every head of it: one choice per key/value group (``gqa=shared``)."""
    if group == 1:
        return scores
    b, h = scores.shape[:2]
    summed = scores.view(b, h // group, group, *scores.shape[2:]).sum(2)
    return summed.repeat_interleave(group, dim=1)


PROMPT_PHASE_HELP = (
    "in deployment the prompt's own forward runs exact, and the cache is chosen from the "
    "prompt's attention"
)

PROMPT_PARAMS = (
    Param("gqa", str, "per-head", "keys chosen per query head, or shared over each group of "
          "`group` heads (scores summed)", choices=("per-head", "shared")),
    Param("group", int, 1, "query heads per key/value head (consecutive heads) for gqa=shared",
          1, 1024),
)  # fmt: skip


class PromptChosen(AttentionMethod):
    """A decode-only method whose cache is chosen from the prompt's attention: it needs the
    prompt's queries (``prepare_cache(..., queries=)``), has no forward of its own, and keeps
    ``keys`` keys per query (``--budget-mode keys`` and ``paper`` agree)."""

    supports_causal = True  # the decode mask, Causal(n_k − M)
    prepares_cache = True
    key_set_note = (
        "it runs decode steps only, over a cache chosen from the prompt's attention: its sets "
        "are the steps' (decode_key_sets(q, cache)), not a forward call's"
    )
    needs_prompt_queries = True
    phases = ("decode",)
    phase_help = PROMPT_PHASE_HELP

    @classmethod
    def exact_limit(cls, n_q, n_k):
        return {"keys": n_k}  # every key is kept: nothing is ever evicted

    def forward_full(self, q, k, v, scale, generator):
        raise UsageError(f"{self.prompt_reasons(None, q.shape, k.shape[-2], Causal(0))[0]}.")

    def forward_causal(self, q, k, v, scale, generator, mask):
        return self.forward_full(q, k, v, scale, generator)

    def decode_key_sets(self, q: torch.Tensor, cache: DecodeCache) -> KeySets:
        """The keys each step of ``decode_step(q, cache)`` read (the cache's n_k wide): the
        same selection code as the steps; each step's output is exact softmax over its set."""
        raise NotImplementedError

    def group(self, heads: int) -> int:
        """Heads per shared choice: ``group`` under gqa=shared (checked to divide), else 1."""
        group = self.config["group"] if self.config["gqa"] == "shared" else 1
        if heads % group:
            raise UsageError(
                f"{self.name}: gqa=shared needs the {heads} heads to split into groups of "
                f"group={group}; pass the model's query heads per key/value head."
            )
        return group

    def flops(self, b, h, n_q, n_k, d, d_v):
        return float(b * h * n_q * min(self.config["keys"], n_k) * (2 * (d + d_v) + 3))

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        # a chunk of the prompt's attention probabilities and of the steps' gathered keys and
        # values (both held under GATHER_ELEMENTS), one step's slots, the scores and the output
        slots = self.config["keys"] + 1
        held = b * h * (n_k + n_q * d_v + slots * (d + d_v + 2))
        return float(itemsize * (3 * GATHER_ELEMENTS + held))
