"""The page oracle ``topk_pages``: the ceiling of ``quest``.

A query reads its own page and the ⌈keys/page⌉ − 1 earlier pages of highest true attention mass
log Σ_{j∈P} e^{ℓ_pj} (the rule and its count: ``kdecli.methods.pages``), then attends exactly to
their keys.  Of all the page choices ``quest`` could make with the same pages it is the one that
keeps the most attention mass, so its error is what the page granularity alone costs, and the gap
from ``quest`` to it is what the min/max bound costs.  It reads every logit to rank the pages:
analysis only, like ``topk``.

    score_p(P) = log Σ_{j∈P} e^{ℓ_pj},   Õ_p = Σ_{j∈S_p} e^{ℓ_pj} v_j / Σ_{j∈S_p} e^{ℓ_pj}
"""

from __future__ import annotations

import torch

from kdecli.methods.pages import PAGE, PageSelection
from kdecli.methods.registry import register


@register
class TopKPages(PageSelection):
    name = "topk_pages"
    summary = "Oracle: each query reads its own page and the pages of highest true attention mass."
    paper = "oracle (the ceiling of `quest`: the best pages of the same size)"
    budget_help = (
        f"m = keys read per query (`keys`): ⌈m/page⌉ pages of {PAGE} keys, the query's own "
        "included (the same under `--budget-mode keys`)."
    )
    role = "oracle"
    cost_help = "like exact attention (every logit, to rank the pages) plus the kept products."

    def page_scores(self, q_scaled, k, prepared, positions):
        page = self.config["page"]
        logits = q_scaled @ k.to(q_scaled.dtype).transpose(-1, -2)  # (b, h, c, n_k)
        n_k = logits.shape[-1]
        pad = (-n_k) % page
        if pad:
            logits = torch.nn.functional.pad(logits, (0, pad), value=float("-inf"))
        return torch.logsumexp(logits.unflatten(-1, (-1, page)), dim=-1)

    def flops(self, b, h, n_q, n_k, d, d_v):
        m = min(self.pages_read() * self.config["page"], n_k)
        return float(b * h * n_q * (2 * n_k * d + 2 * n_k + m * (2 * (d + d_v) + 3)))
