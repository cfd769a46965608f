"""Quest (Tang, Zhao, Zhu, Xiao, Kasikci, Han, ICML 2024): query-aware page selection.

Each page of ``page`` consecutive keys (default 16) stores the element-wise min and max of its
keys.  For a query q the page's bound is

    U(q, P) = Σ_d max(q_d · min_d, q_d · max_d) = q⁺ · max_P + q⁻ · min_P  ≥  q · k   for every k ∈ P

(q⁺ and q⁻ the positive and negative parts of q), two products per page instead of ``page``.  The
query reads its own page and the ⌈keys/page⌉ − 1 earlier pages of highest bound, then attends
exactly to their keys (the rule and its count: ``kdecli.methods.pages``).  Its ceiling with the
same pages is the oracle ``topk_pages``.  Exact when the pages read cover the prefix.
"""

from __future__ import annotations

import torch

from kdecli.methods.pages import PAGE, PageSelection
from kdecli.methods.registry import register


@register
class Quest(PageSelection):
    name = "quest"
    summary = (
        "Quest: pages ranked by a min/max bound on q·k; the query's own page and the top ones."
    )
    paper = "Tang, Zhao, Zhu, Xiao, Kasikci, Han, ICML 2024 (Quest)"
    budget_help = (
        f"m = keys read per query (`keys`): ⌈m/page⌉ pages of {PAGE} keys, the query's own "
        "included (the same under `--budget-mode keys`)."
    )
    cost_help = (
        "2·n_q·(n_k/page)·2d for the bounds, 2·n_q·m·(d + d_v) for the pages read; the page "
        "min/max (a pass over the keys) is prepared once per cache."
    )

    def prepare_pages(self, k):
        return page_bounds(k, self.config["page"])

    def page_scores(self, q_scaled, k, prepared, positions):
        low, high = prepared
        return q_scaled.clamp(min=0) @ high.transpose(-1, -2) + q_scaled.clamp(
            max=0
        ) @ low.transpose(-1, -2)

    def flops(self, b, h, n_q, n_k, d, d_v):
        pages = -(-n_k // self.config["page"])
        m = min(self.pages_read() * self.config["page"], n_k)
        return float(b * h * (n_q * pages * 4 * d + n_q * m * (2 * (d + d_v) + 3) + 2 * n_k * d))


def page_bounds(k: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of each page's keys, (b, h, ⌈n_k/page⌉, d) each; a short last page is padded
    with copies of its last key, which moves neither."""
    n_k = k.shape[-2]
    pad = (-n_k) % page
    if pad:
        k = torch.cat([k, k[..., -1:, :].expand(*k.shape[:-2], pad, k.shape[-1])], dim=-2)
    pages = k.unflatten(-2, (-1, page))
    return pages.amin(-2), pages.amax(-2)
