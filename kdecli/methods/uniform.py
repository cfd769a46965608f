"""Uniform key sampling: the floor every importance-sampling method must beat.

For one slice, S is a set of m keys drawn uniformly without replacement (one set per slice):

    Õ_i = Σ_{j∈S} e^{ℓ_ij − c_i} v_j / Σ_{j∈S} e^{ℓ_ij − c_i},   c_i = max_{j∈S} ℓ_ij

The weights n_k/m of the sampled keys cancel in the ratio.  Exact when m >= n_k.

Causal(offset): query i sits at position p_i = offset + i and uses S ∩ {j ≤ p_i}, a uniform sample
of its own prefix (S is drawn from the offset + n_q keys some query sees).  A query whose prefix holds
no sampled key (every p_i before the first sampled index) has nothing to estimate from, so it attends
exactly to its prefix; those prefixes are shorter than the first sampled index, about n_k/(m+1) keys
in expectation, so the fallback costs far less than the sampled part.

Key sets and row sums (``kdecli.methods.keysets``): query i's set is S ∩ {j ≤ p_i} (its prefix
when that is empty).  The output is softmax over the set, but the row sum the sample stands for is
the scaled one, D̃_i = (n_k/m)·Σ_{j∈S, j ≤ p_i} e^{ℓ_ij} (each key is drawn with probability m/n_k),
so the sets are reported as an estimator's (``exact_over_set`` False) with that ``log_row_sums``.
"""

from __future__ import annotations

import math

import torch

from kdecli.masks import FULL, Causal, Mask
from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.common import gather_rows
from kdecli.methods.keyset_calls import Call
from kdecli.methods.keysets import KeySets
from kdecli.methods.registry import register


@register
class Uniform(AttentionMethod):
    name = "uniform"
    summary = "Softmax over m keys sampled uniformly without replacement (one set per slice)."
    paper = "baseline (the floor of importance sampling)"
    budget_help = "m = number of sampled keys per slice (`samples`)."
    params = (Param("samples", int, 256, "keys drawn uniformly without replacement (m)", 1, 2**24),)
    randomized = True
    supports_causal = True
    key_set_note = ""  # it returns its key sets
    cost_help = "2·n_q·m·(d + d_v) for the sampled products (+ the short exact prefix when causal)."

    @classmethod
    def params_for_budget(cls, budget):
        return {"samples": budget}

    def keys_per_query(self, n_q, n_k, mask=FULL):
        # m sampled keys (at most n_k); causal (n_k = offset + n_q): those before the query,
        # m·(2·offset + n_q + 1)/(2·n_k) on average (m·(n + 1)/(2n) for prefill)
        m = min(self.config["samples"], n_k)
        return m * (2 * mask.offset + n_q + 1) / (2 * n_k) if mask.is_causal else float(m)

    @classmethod
    def exact_limit(cls, n_q, n_k):
        return {"samples": n_k}  # the sample is every key (causal: every key of each prefix)

    def forward_full(self, q, k, v, scale, generator):
        return sampled_attention(q * scale, k, v, self.draw(k, generator), FULL)

    def forward_causal(self, q, k, v, scale, generator, mask):
        return sampled_attention(q * scale, k, v, self.draw(k, generator), mask)

    def key_sets(self, q, k, v, scale, generator, mask=FULL):
        call = Call.of(self, q, k, v, mask)
        return call.widened(self.sampled_sets(call, generator)[1])

    def sampled_sets(self, call: Call, generator) -> tuple[torch.Tensor, KeySets]:
        """(the draw (b, h, m), each query's set): S ∩ {j ≤ p_i}, or its whole prefix when that
        holds no sampled key.  The output is softmax over the set, but the row sum the sample
        stands for is (n_k/m)·Σ_S e^ℓ (``log_row_sums``), not the set's own: an estimator."""
        n_q, n_k = call.q.shape[-2], call.k.shape[-2]
        index = self.draw(call.k, generator)
        sampled = torch.zeros(*index.shape[:2], n_k, dtype=torch.bool, device=index.device)
        sampled.scatter_(-1, index, True)

        def rows(start: int, stop: int) -> torch.Tensor:
            seen = call.mask.rows(start).allowed(stop - start, n_k, device=index.device)
            if seen is None:
                return sampled.unsqueeze(-2).expand(-1, -1, stop - start, -1)
            read = sampled.unsqueeze(-2) & seen
            return torch.where(read.any(-1, keepdim=True), read, seen)

        return index, KeySets(n_q, n_k, rows, exact_over_set=False)

    def log_row_sums(self, q, k, v, scale, generator, mask=FULL):
        """log D̃_i = log(n_k/m) + log Σ_{j∈S, j ≤ p_i} e^{ℓ_ij}: each key is in the sample with
        probability m/n_k, so the scaled sample sum is unbiased for the row sum (its prefix's,
        causal); a query that attends exactly to its prefix has its exact row sum."""
        call = Call.of(self, q, k, v, mask)
        index, sets = self.sampled_sets(call, generator)
        n_q, n_k = q.shape[-2], call.k.shape[-2]
        weight = math.log(n_k / min(self.config["samples"], n_k))
        first = index[..., :1]  # (b, h, 1): the smallest sampled index of each slice
        step = max(1, 2**22 // (q.shape[0] * q.shape[1] * n_k))
        pieces = []
        for start in range(0, n_q, step):
            stop = min(n_q, start + step)
            logits = (q[..., start:stop, :] * scale) @ call.k.transpose(-1, -2)
            lse = torch.logsumexp(logits.masked_fill(~sets.rows(start, stop), -math.inf), -1)
            if not call.mask.is_causal:
                pieces.append(lse + weight)
                continue
            position = torch.arange(start, stop, device=q.device) + call.mask.offset
            pieces.append(torch.where(position >= first, lse + weight, lse))
        return torch.cat(pieces, dim=-1)

    def draw(self, k, generator):
        """The sampled key indices (b, h, m), ascending: the m smallest of n_k uniform draws are a
        uniform m-subset, sorted so that a causal prefix is a leading run."""
        b, h, n_k, _ = k.shape
        m = min(self.config["samples"], n_k)
        keys = torch.rand(b, h, n_k, generator=generator, device=k.device)
        return torch.sort(torch.topk(keys, m, dim=-1, largest=False).indices, dim=-1).values

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        # The logits of every query against its m sampled keys, their softmax, the gathered
        # keys and values.
        m = min(self.config["samples"], n_k)
        return float(b * h * itemsize * (4 * n_q * m + 2 * m * (d + d_v) + 2 * n_q * d_v))

    def flops(self, b, h, n_q, n_k, d, d_v):
        m = min(self.config["samples"], n_k)
        return float(b * h * (2 * n_q * m * (d + d_v) + n_q * m))


def sampled_attention(
    q_scaled: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, mask: Mask
) -> torch.Tensor:
    """Softmax attention over the keys at ``index`` (b, h, m) under ``mask`` (causal: ``index``
    sorted ascending; query i sees the sampled keys j ≤ offset + i)."""
    logits = q_scaled @ gather_rows(k, index).transpose(-1, -2)  # (b, h, n_q, m)
    if mask.is_causal:
        rows = (torch.arange(q_scaled.shape[-2], device=k.device) + mask.offset).view(1, 1, -1, 1)
        logits = logits.masked_fill(index.unsqueeze(-2) > rows, float("-inf"))
    c = logits.amax(-1, keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))  # rows with no key (causal only)
    weights = torch.exp(logits - c)
    total = weights.sum(-1, keepdim=True)
    out = (weights @ gather_rows(v, index)) / torch.where(total > 0, total, torch.ones_like(total))
    if mask.is_causal:
        out = _exact_before_first_sample(q_scaled, k, v, index, out, mask.offset)
    return out


def _exact_before_first_sample(q_scaled, k, v, index, out, offset):
    """Queries before the first sampled key (empty sampled prefix) attend exactly to their prefix:
    the first p queries at most, p = (first sampled index) − offset."""
    first = index[..., 0]  # (b, h): the smallest sampled index of each slice
    p = min(q_scaled.shape[-2], int(first.max()) - offset)
    if p <= 0:
        return out
    keys = offset + p
    logits = q_scaled[..., :p, :] @ k[..., :keys, :].transpose(-1, -2)
    hidden = ~Causal(offset).allowed(p, keys, device=k.device)
    exact = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1) @ v[..., :keys, :]
    positions = torch.arange(p, device=k.device) + offset
    empty = positions.view(1, 1, p, 1) < first.view(*first.shape, 1, 1)
    return torch.cat([torch.where(empty, exact, out[..., :p, :]), out[..., p:, :]], dim=-2)
