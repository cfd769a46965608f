"""Uniform key sampling: the floor every importance-sampling method must beat.

For one slice, S is a set of m keys drawn uniformly without replacement (one set per slice):

    Õ_i = Σ_{j∈S} e^{ℓ_ij − c_i} v_j / Σ_{j∈S} e^{ℓ_ij − c_i},   c_i = max_{j∈S} ℓ_ij

The weights n_k/m of the sampled keys cancel in the ratio.  Exact when m >= n_k.

Causal(offset): query i sits at position p_i = offset + i and uses S ∩ {j ≤ p_i}, a uniform sample
of its own prefix (S is drawn from the offset + n_q keys some query sees).  A query whose prefix holds
no sampled key (every p_i before the first sampled index) has nothing to estimate from, so it attends
exactly to its prefix; those prefixes are shorter than the first sampled index, about n_k/(m+1) keys
in expectation, so the fallback costs far less than the sampled part.
"""

from __future__ import annotations

import torch

from kdecli.masks import FULL, Causal, Mask
from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.common import gather_rows
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
