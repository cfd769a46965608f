"""H2O (Zhang et al., NeurIPS 2023): heavy hitters and recent keys, evicted as decoding goes.

Each key carries a score, the attention it has received so far.  From the prompt (P positions,
its queries run exact in deployment) the score of key j is the column sum of the causal attention
probabilities of the prompt's queries,

    s_j = Σ_{i<P, i≥j} softmax_j(ℓ_ij : j ≤ i).

A decode query reads ``keys`` = m keys, its own included: the ``recent`` = r most recent
positions up to its own and the m − r others of highest score.  Before the first step the
cache is cut to m − 1 prompt keys (the r − 1 last prompt positions and the m − r top-scoring
others).  Then each decode query at position p, in order:

  1. its own key enters the cache (score 0), which now holds m keys;
  2. it attends exactly over them (renormalised), Õ_p = Σ_{j∈S} e^{ℓ_pj} v_j / Σ_{j∈S} e^{ℓ_pj};
  3. its attention probabilities are added to the scores of the keys it read;
  4. the lowest-scoring key outside the next query's recent window (positions < p + 2 − r) is
     evicted: m − 1 keys remain, and an evicted key never returns.

With ``gqa=shared`` the scores are summed over each group of ``group`` heads before every choice,
so a key/value group keeps one set.  Exact when m covers the cache (nothing is evicted).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from kdecli.masks import FULL
from kdecli.methods.base import Param
from kdecli.methods.common import gather_rows, working_dtype
from kdecli.methods.decode import DecodeCache
from kdecli.methods.keysets import KeySets
from kdecli.methods.registry import register
from kdecli.methods.selection import (
    PROMPT_PARAMS,
    PromptChosen,
    group_total,
    mean_kept,
    prompt_attention,
)


@dataclass(frozen=True, eq=False)
class HeavyHitterCache(DecodeCache):
    """The cache before the first decode step: ``index`` (b, h, m − 1) the positions kept from
    the prompt, ``valid`` which slots hold one (a prompt shorter than m − 1 leaves some empty)
    and ``scores`` their accumulated attention (−inf for an empty slot: it is filled first)."""

    index: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    scores: torch.Tensor | None = None


class Step(NamedTuple):
    """One decode step: the positions it read (``index``, ``valid``: b, h, m) and its output
    (b, h, 1, d_v)."""

    index: torch.Tensor
    valid: torch.Tensor
    out: torch.Tensor


@register
class H2O(PromptChosen):
    name = "h2o"
    summary = "H2O: heavy hitters by accumulated attention plus the recent keys; evictions final."
    paper = (
        "Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Ré, Barrett, Wang, Chen, NeurIPS 2023 "
        "(H2O)"
    )
    budget_help = (
        "m = keys each decode query reads, its own included: recent = m // 2 most recent and "
        "m − recent heavy hitters (the same under `--budget-mode keys`)."
    )
    params = (
        Param("keys", int, 256, "keys each decode query reads, its own included", 1, 2**24),
        Param("recent", int, 128, "most recent positions kept, the query's own included "
              "(at most `keys`)", 1, 2**24),
        *PROMPT_PARAMS,
    )  # fmt: skip
    cost_help = (
        "2·M·m·(d + d_v) for the steps; the prompt's attention column sums (P²·d, which the "
        "prompt's own exact forward computes in deployment) are prepared once per cache."
    )

    @classmethod
    def params_for_budget(cls, budget):
        return {"keys": budget, "recent": max(1, budget // 2)}

    def keys_per_query(self, n_q, n_k, mask=FULL):
        return mean_kept(lambda p: torch.clamp(p + 1, max=self.config["keys"]), n_q, n_k, mask)

    def recent(self) -> int:
        return min(self.config["recent"], self.config["keys"])

    def prepare_decode(self, cache: DecodeCache) -> HeavyHitterCache:
        b, h = cache.k.shape[:2]
        group = self.group(h)
        work = working_dtype(cache.k.dtype)
        prompt = cache.mask.offset  # a decode mask: prompt_reasons has checked it
        k = cache.k[..., :prompt, :].to(work)
        scores = prompt_attention(cache.queries.to(work) * cache.scale, k, first=0)
        held = self.config["keys"] - 1
        positions = torch.arange(prompt, device=k.device)
        if prompt > held:  # the first step's recent window wins, then the heavy hitters
            choice = group_total(scores, group)
            in_window = positions >= prompt + 1 - self.recent()
            choice = choice.masked_fill(in_window, float("inf"))
            index = torch.topk(choice, held, dim=-1).indices.sort(-1).values
        else:
            index = positions.expand(b, h, -1)
        kept = scores.gather(-1, index)
        empty = held - index.shape[-1]
        valid = torch.ones_like(index, dtype=torch.bool)
        if empty > 0:
            index = torch.cat([index, index.new_zeros(b, h, empty)], dim=-1)
            valid = torch.cat([valid, valid.new_zeros(b, h, empty)], dim=-1)
            kept = torch.cat([kept, kept.new_full((b, h, empty), float("-inf"))], dim=-1)
        return HeavyHitterCache.prepared(cache, index=index, valid=valid, scores=kept)

    def forward_decode(self, q, cache):
        return torch.cat([step.out for step in self.steps(q, cache)], dim=-2).to(cache.v.dtype)

    def decode_key_sets(self, q, cache):
        # the steps themselves: what each read, after the evictions of the steps before it
        steps = list(self.steps(q, cache))
        index = torch.stack([step.index for step in steps], dim=-2)  # (b, h, n_q, m)
        valid = torch.stack([step.valid for step in steps], dim=-2)
        return KeySets.from_index(
            q.shape[-2],
            cache.keys,
            lambda start, stop: (index[..., start:stop, :], valid[..., start:stop, :]),
        )

    def steps(self, q: torch.Tensor, cache: HeavyHitterCache) -> Iterator[Step]:
        """The decode steps of the module docstring, in order (a step's kept set is what the
        previous one left): what each read and its output."""
        b, h, n_q, _ = q.shape
        group = self.group(h)
        work = working_dtype(q.dtype)
        k, v = cache.k.to(work), cache.v.to(work)
        qs = q.to(work) * cache.scale
        index, valid, scores = cache.index, cache.valid, cache.scores
        first = cache.keys - n_q
        recent = self.recent()
        for i in range(n_q):
            p = first + i
            index = torch.cat([index, index.new_full((b, h, 1), p)], dim=-1)
            valid = torch.cat([valid, valid.new_ones(b, h, 1)], dim=-1)
            scores = torch.cat([scores, scores.new_zeros(b, h, 1)], dim=-1)
            logits = torch.einsum("bhd,bhmd->bhm", qs[..., i, :], gather_rows(k, index))
            weights = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
            out = torch.einsum("bhm,bhmd->bhd", weights, gather_rows(v, index))
            yield Step(index, valid, out.unsqueeze(-2))
            scores = scores + weights  # an empty slot stays at −inf
            choice = group_total(scores, group)
            choice = choice.masked_fill(valid & (index >= p + 2 - recent), float("inf"))
            stay = torch.ones_like(valid).scatter(-1, choice.argmin(-1, keepdim=True), False)
            index, valid, scores = (x[stay].view(b, h, -1) for x in (index, valid, scores))
