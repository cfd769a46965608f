"""Page selection over the KV cache: the rule ``quest`` shares with its ceiling, ``topk_pages``.

The keys are cut into pages of ``page`` consecutive positions (the last one possibly short).  A
query at position p reads R = ⌈keys/page⌉ pages: its own page ⌊p/page⌋ (the keys of it up to p:
the page being written) and the R − 1 earlier pages with the highest *score*, then attends exactly
to the keys they hold:

    S_p = {j : ⌊j/page⌋ ∈ {⌊p/page⌋} ∪ top_{R−1}(score_p(P) : P < ⌊p/page⌋), j ≤ p}
    |S_p| = (p mod page) + 1 + page · min(R − 1, ⌊p/page⌋)

The score is what tells the methods apart: ``quest`` bounds q·k over the page from its keys'
element-wise min and max (it reads 2 vectors per page, not the page); ``topk_pages``, an oracle,
takes the page's true attention mass log Σ_{j∈P} e^{ℓ_pj}, so it is the best any page rule with the
same pages can do, and the gap between the two is the cost of the bound.

Grouped-query attention (``gqa=shared``): deployed systems choose one set of pages per key/value
group.  kdecli's inputs hold one key/value head per query head (captures repeat a group's keys),
so the group is a parameter, ``group`` query heads per key/value head (consecutive heads), and the
scores are summed over the group before the choice.
"""

from __future__ import annotations

import math

import torch

from kdecli.errors import UsageError
from kdecli.masks import FULL
from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.common import working_dtype
from kdecli.methods.keyset_calls import Call
from kdecli.methods.selection import (
    GATHER_ELEMENTS,
    Selection,
    attend,
    mean_kept,
    query_positions,
    selected_sets,
)

PAGE = 16  # Quest's default page size

PAGE_PARAMS = (
    Param("keys", int, 256, "keys read per query: ⌈keys/page⌉ pages, the query's own included",
          1, 2**24),
    Param("page", int, PAGE, "consecutive positions per page", 1, 2**20),
    Param("gqa", str, "per-head", "pages chosen per query head, or shared over each group of "
          "`group` heads (scores summed)", choices=("per-head", "shared")),
    Param("group", int, 1, "query heads per key/value head (consecutive heads) for gqa=shared",
          1, 1024),
)  # fmt: skip


class PageSelection(AttentionMethod):
    """The page rule of the module docstring; a subclass gives ``page_scores``."""

    params = PAGE_PARAMS
    supports_causal = True
    key_set_note = ""  # it returns its key sets

    @classmethod
    def params_for_budget(cls, budget):
        return {"keys": budget}

    @classmethod
    def exact_limit(cls, n_q, n_k):
        return {"keys": n_k}  # every page is read

    def pages_read(self) -> int:
        return math.ceil(self.config["keys"] / self.config["page"])

    def kept(self, positions: torch.Tensor) -> torch.Tensor:
        """|S_p| for each position p."""
        page = self.config["page"]
        earlier = torch.clamp(positions // page, max=self.pages_read() - 1)
        return positions % page + 1 + page * earlier

    def keys_per_query(self, n_q, n_k, mask=FULL):
        return mean_kept(self.kept, n_q, n_k, mask)

    def forward_full(self, q, k, v, scale, generator):
        return self.forward_causal(q, k, v, scale, generator, FULL)

    def forward_causal(self, q, k, v, scale, generator, mask):
        select = self.selection(q, k, scale, mask)
        return attend(q, k, v, scale, self.slots(), select)

    def key_sets(self, q, k, v, scale, generator, mask=FULL):
        call = Call.of(self, q, k, v, mask)
        select = self.selection(q, call.k, scale, call.mask)
        return call.widened(selected_sets(q, call.v, call.k.shape[-2], self.slots(), select))

    def slots(self) -> int:
        return self.pages_read() * self.config["page"]

    def selection(self, q, k, scale, mask):
        """``select(start, stop)`` of the call's queries under ``mask`` (forward and sets)."""
        b, h, n_q, _ = q.shape
        group = self.config["group"] if self.config["gqa"] == "shared" else 1
        if h % group:
            raise UsageError(
                f"{self.name}: gqa=shared needs the {h} heads to split into groups of "
                f"group={group}; pass the model's query heads per key/value head."
            )
        positions = query_positions(n_q, k.shape[-2], mask, q.device)
        prepared = self.prepare_pages(k.to(working_dtype(k.dtype)))
        return self.selector(q.to(working_dtype(q.dtype)), k, scale, positions, prepared)

    def prepare_pages(self, k: torch.Tensor):
        """What the scores read from the keys (computed once per call)."""
        return None

    def page_scores(self, q_scaled, k, prepared, positions) -> torch.Tensor:
        """(b, h, c, n_pages) scores of the chunk's queries for every page."""
        raise NotImplementedError

    def selector(self, q, k, scale, positions, prepared):
        page, pages = self.config["page"], self.pages_read()
        b, h = q.shape[:2]
        n_k = k.shape[-2]
        n_pages = math.ceil(n_k / page)
        others = min(pages - 1, n_pages)
        group = self.config["group"] if self.config["gqa"] == "shared" else 1
        in_page = torch.arange(page, device=q.device)

        def select(start: int, stop: int) -> Selection:
            p = positions[start:stop]
            own = (p // page).view(1, 1, -1, 1).expand(b, h, -1, 1)
            chosen, chosen_valid = own, torch.ones_like(own, dtype=torch.bool)
            if others > 0:
                scores = self.page_scores(q[..., start:stop, :] * scale, k, prepared, p)
                if group > 1:  # one choice per key/value group: scores summed over its heads
                    summed = scores.view(b, h // group, group, *scores.shape[2:]).sum(2)
                    scores = summed.repeat_interleave(group, dim=1)
                earlier = torch.arange(n_pages, device=q.device) < (p // page).unsqueeze(-1)
                scores = scores.masked_fill(~earlier, float("-inf"))
                top = torch.topk(scores, others, dim=-1)
                chosen = torch.cat([own, top.indices], dim=-1)
                chosen_valid = torch.cat([chosen_valid, top.values > float("-inf")], dim=-1)
            index = (chosen.unsqueeze(-1) * page + in_page).flatten(-2)  # (b, h, c, R·page)
            valid = chosen_valid.repeat_interleave(page, dim=-1) & (index <= p.view(1, 1, -1, 1))
            return Selection(index.clamp(max=n_k - 1), valid)

        return select

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        slots = self.pages_read() * self.config["page"]
        return float(itemsize * (2 * GATHER_ELEMENTS + 2 * b * h * n_q * (slots + d_v)))
