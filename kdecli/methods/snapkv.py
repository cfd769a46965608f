"""SnapKV (Li et al., 2024): the prompt's last queries vote for the keys to keep, once.

The last w = min(``obs``, P, m) queries of a P-position prompt (the observation window, default
32) vote for the keys before the window: per head,

    vote_j = Σ_{i ∈ window} softmax_j(ℓ_ij : j ≤ i),   j < P − w,

max-pooled along the positions (kernel ``pool``, default 7, so a key's neighbours come along),
and the m − w keys of highest pooled vote are kept with the window's w keys.  The choice is made
once, from the prompt, and then fixed: the decode query at position p attends exactly over the
kept prompt keys and the decode positions up to its own, P..p, so it reads min(m, P) + p − P + 1
keys.  With ``gqa=shared`` the votes are summed over each group of ``group`` heads before the
pooling, so a key/value group keeps one set.  Exact when m covers the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdecli.masks import FULL
from kdecli.methods.base import Param
from kdecli.methods.common import working_dtype
from kdecli.methods.decode import DecodeCache
from kdecli.methods.registry import register
from kdecli.methods.selection import (
    PROMPT_PARAMS,
    PromptChosen,
    Selection,
    attend,
    group_total,
    prompt_attention,
    query_positions,
    selected_sets,
)

OBSERVATION = 32  # SnapKV's observation window
POOL = 7  # SnapKV's pooling kernel


@dataclass(frozen=True, eq=False)
class SnapCache(DecodeCache):
    """The cache chosen from the prompt: ``kept`` (b, h, min(m, P)) positions, sorted."""

    kept: torch.Tensor | None = None


@register
class SnapKV(PromptChosen):
    name = "snapkv"
    summary = "SnapKV: the prompt's last queries vote (max-pooled) for the keys kept, once."
    paper = "Li, Huang, Yang, Venkitesh, Locatelli, Ye, Cai, Lewis, Chen, NeurIPS 2024 (SnapKV)"
    budget_help = (
        "m = prompt keys kept: the `obs` window's and the m − obs of highest pooled vote; a "
        "decode query also reads the decode positions up to its own (the same under "
        "`--budget-mode keys`)."
    )
    params = (
        Param("keys", int, 256, "prompt keys kept, the observation window's included", 1, 2**24),
        Param("obs", int, OBSERVATION, "the last prompt queries that vote (the observation "
              "window)", 1, 2**24),
        Param("pool", int, POOL, "max-pooling kernel over the votes, in positions", 1, 1025),
        *PROMPT_PARAMS,
    )  # fmt: skip
    cost_help = (
        "2·M·(m + M)·(d + d_v) for the steps; the window's votes (obs·P·d) and their pooling "
        "are prepared once per cache."
    )

    @classmethod
    def params_for_budget(cls, budget):
        return {"keys": budget}

    def keys_per_query(self, n_q, n_k, mask=FULL):
        positions = query_positions(n_q, n_k, mask, torch.device("cpu"))
        prompt = mask.offset if mask.is_causal else n_k - 1  # one step: the rest is prompt
        kept = min(self.config["keys"], prompt) + positions - prompt + 1
        return float(kept.double().mean())

    def prepare_decode(self, cache: DecodeCache) -> SnapCache:
        b, h = cache.k.shape[:2]
        group = self.group(h)
        prompt = cache.mask.offset  # a decode mask: prompt_reasons has checked it
        keys = self.config["keys"]
        positions = torch.arange(prompt, device=cache.k.device)
        if prompt <= keys:
            return SnapCache.prepared(cache, kept=positions.expand(b, h, -1))
        window = min(self.config["obs"], prompt, keys)
        prefix = prompt - window
        work = working_dtype(cache.k.dtype)
        observed = cache.queries[..., prefix:, :].to(work) * cache.scale
        vote = prompt_attention(observed, cache.k[..., :prompt, :].to(work), first=prefix)
        vote = group_total(vote[..., :prefix], group)
        pool = self.config["pool"]
        pooled = torch.nn.functional.max_pool1d(
            vote.reshape(b * h, 1, prefix), pool, stride=1, padding=pool // 2
        )[..., :prefix].reshape(b, h, prefix)
        top = torch.topk(pooled, keys - window, dim=-1).indices
        kept = torch.cat([top, positions[prefix:].expand(b, h, -1)], dim=-1).sort(-1).values
        return SnapCache.prepared(cache, kept=kept)

    def forward_decode(self, q, cache):
        slots, select = self.step_selection(q, cache)
        return attend(q, cache.k, cache.v, cache.scale, slots, select)

    def decode_key_sets(self, q, cache):
        slots, select = self.step_selection(q, cache)
        return selected_sets(q, cache.v, cache.keys, slots, select)

    def step_selection(self, q, cache):
        """(slots, ``select(start, stop)``) of the steps: the kept prompt keys and the decode
        positions up to each query's own."""
        kept = cache.kept
        b, h, n_q, _ = q.shape
        first = cache.keys - n_q
        decoded = torch.arange(first, cache.keys, device=q.device)
        slots = kept.shape[-1] + n_q

        def select(start: int, stop: int) -> Selection:
            c = stop - start
            index = torch.cat(
                [kept.unsqueeze(-2).expand(b, h, c, -1), decoded.expand(b, h, c, -1)], dim=-1
            )
            own = decoded <= (first + torch.arange(start, stop, device=q.device)).unsqueeze(-1)
            valid = torch.cat([torch.ones_like(kept, dtype=torch.bool).unsqueeze(-2).expand(
                b, h, c, -1), own.expand(b, h, c, -1)], dim=-1)  # fmt: skip
            return Selection(index, valid)

        return slots, select
