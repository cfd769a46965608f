"""StreamingLLM (Xiao et al., ICLR 2024): attention sinks and a sliding window.

A query at key position p keeps the first ``sinks`` positions and the last ``window`` positions up
to and including its own, and attends exactly to them:

    S_p = {j ≤ p : j < sinks} ∪ {j : max(sinks, p − window + 1) ≤ j ≤ p}
    Õ_p = Σ_{j∈S_p} e^{ℓ_pj} v_j / Σ_{j∈S_p} e^{ℓ_pj}

The set does not depend on the query, only on its position; |S_p| = min(sinks, p + 1) +
max(0, min(window, p + 1 − sinks)).  In prefill (``Causal(0)``) this is MInference's "A-shape"
pattern; a decode step keeps the sinks and the most recent keys.  Under ``FULL`` every query sits
at the last key position (``kdecli.methods.selection``).  Exact when sinks + window covers the
prefix.
"""

from __future__ import annotations

import torch

from kdecli.masks import FULL
from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.keyset_calls import Call
from kdecli.methods.registry import register
from kdecli.methods.selection import (
    Selection,
    attend,
    mean_kept,
    query_positions,
    selected_sets,
    sinks_and_window,
)

SINKS = 4  # the paper's four initial tokens


@register
class Streaming(AttentionMethod):
    name = "streaming"
    summary = "StreamingLLM: the first `sinks` keys and a window of the most recent ones, exact."
    paper = "Xiao, Tian, Chen, Han, Lewis, ICLR 2024 (StreamingLLM; MInference's A-shape)"
    budget_help = (
        f"m = keys kept per query: sinks = {SINKS} and window = m − {SINKS} (the same under "
        "`--budget-mode keys`)."
    )
    params = (
        Param(
            "sinks", int, SINKS, "initial positions every query keeps (attention sinks)", 0, 2**24
        ),
        Param(
            "window",
            int,
            256 - SINKS,
            "most recent positions kept, the query's own included",
            1,
            2**24,
        ),  # fmt: skip
    )
    supports_causal = True
    key_set_note = ""  # it returns its key sets
    cost_help = "2·n_q·(sinks + window)·(d + d_v) for the kept products, no scoring pass."

    @classmethod
    def params_for_budget(cls, budget):
        if budget > SINKS:
            return {"window": budget - SINKS}
        return {"sinks": budget - 1, "window": 1}

    @classmethod
    def exact_limit(cls, n_q, n_k):
        return {"window": n_k}  # the window alone covers every prefix

    def kept(self, positions: torch.Tensor) -> torch.Tensor:
        """|S_p| for each position p: the keys a query there reads."""
        return sinks_and_window(positions, self.config["sinks"], self.config["window"])

    def keys_per_query(self, n_q, n_k, mask=FULL):
        return mean_kept(self.kept, n_q, n_k, mask)

    def forward_full(self, q, k, v, scale, generator):
        return self.forward_causal(q, k, v, scale, generator, FULL)

    def forward_causal(self, q, k, v, scale, generator, mask):
        select = self.selection(q, k, mask)
        return attend(q, k, v, scale, self.slots(), select)

    def key_sets(self, q, k, v, scale, generator, mask=FULL):
        call = Call.of(self, q, k, v, mask)
        select = self.selection(q, call.k, call.mask)
        return call.widened(selected_sets(q, call.v, call.k.shape[-2], self.slots(), select))

    def selection(self, q, k, mask):
        """``select(start, stop)`` of the call's queries under ``mask`` (forward and sets)."""
        positions = query_positions(q.shape[-2], k.shape[-2], mask, q.device)
        return self.selector(positions, k.shape[-2], q.shape[:2])

    def slots(self) -> int:
        return self.config["sinks"] + self.config["window"]

    def selector(self, positions: torch.Tensor, n_k: int, lead: torch.Size):
        """``select(start, stop)`` for ``attend``: the sink slots, then the window's."""
        sinks, window = self.config["sinks"], self.config["window"]
        device = positions.device
        sink_slots = torch.arange(sinks, device=device)
        window_slots = torch.arange(1 - window, 1, device=device)

        def select(start: int, stop: int) -> Selection:
            p = positions[start:stop].unsqueeze(-1)
            recent = p + window_slots  # p − window + 1 .. p
            index = torch.cat([sink_slots.expand(p.shape[0], -1), recent], dim=-1)
            valid = torch.cat(
                [sink_slots <= p, recent >= max(sinks, 0)], dim=-1
            )  # a sink after the query, or a window slot before position `sinks`, is unused
            index = index.clamp(0, n_k - 1).expand(*lead, -1, -1)
            return Selection(index, valid.expand(*lead, -1, -1))

        return select

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        # the gathered keys and values of one chunk of queries, their logits, and the output
        from kdecli.methods.selection import GATHER_ELEMENTS

        return float(itemsize * (2 * GATHER_ELEMENTS + 2 * b * h * n_q * (self.slots() + d_v)))

    def flops(self, b, h, n_q, n_k, d, d_v):
        m = min(self.slots(), n_k)
        return float(b * h * n_q * m * (2 * (d + d_v) + 3))
