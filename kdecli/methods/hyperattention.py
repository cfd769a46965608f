"""HyperAttention: sorted-LSH blocks computed exactly plus a uniformly sampled residual.

Han, Jayaram, Karbasi, Mirrokni, Woodruff, Zandieh, "HyperAttention: Long-context Attention in
Near-Linear Time", ICLR 2024.  For query i in sorted-LSH block t (``kdecli.methods.lsh``) and m key
indices π_1..π_m drawn uniformly with replacement (one set per slice):

    L₁ = log Σ_{j ∈ block t} e^{ℓ_ij},                      O₁ = softmax over the block · V
    L₂ = log Σ_{u ≤ m} [block(π_u) ≠ t] e^{ℓ_iπ_u} + log(n_k/m), O₂ = softmax over those samples · V
    Õ_i = (e^{L₁}O₁ + e^{L₂}O₂) / (e^{L₁} + e^{L₂})            (``merge_lse``)

The mask keeps in-block keys from being counted twice; the residual sum is an unbiased estimate of
the off-block sum.  A block of attention whose key count is below ``min_seq_len`` is computed exactly.
Pairing of query and key blocks: ``rank``, ``aligned`` or ``auto`` (default), as for kdeformer
(``kdecli.methods.lsh``, docs/methods.md).  In the causal decomposition a full block's queries
and keys are different positions, so ``auto`` pairs them aligned.

Causal: the paper's recursion, which kdecli shares with every method (``kdecli.methods.causal``):
both diagonal halves recurse causally, the lower-left block, whose queries all come after its keys,
is non-causal HyperAttention, and the pieces merge by log-sum-exp; pieces of at most
max(min_seq_len, block_size) positions are exact (one block would hold all their keys anyway).
Queries of a full block are sorted among themselves, so a later query can move an earlier one's
block (never a later key into it).  Exact when one block holds every key (block_size >= n_k) or
n_k < min_seq_len.

Key sets (``kdecli.methods.keysets``): block t ∪ {π_u} (every key below min_seq_len), an estimate
over them; ``log_row_sums``: log(e^{L₁} + e^{L₂}), merged over the pieces under a causal mask.
"""

from __future__ import annotations

import math

import torch

from kdecli.masks import FULL
from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.causal import Partial, exact_partial, softmax_part
from kdecli.methods.common import gather_rows, merge_lse
from kdecli.methods.keyset_calls import decomposed_key_sets, decomposed_log_row_sums
from kdecli.methods.lsh import (
    PAIRING,
    SortedBlocks,
    block_sets,
    resolve_pairing,
    sort_into_blocks,
)
from kdecli.methods.registry import register


@register
class HyperAttention(AttentionMethod):
    name = "hyperattention"
    summary = "Sorted angular-LSH blocks exactly + uniform residual samples, merged by log-sum-exp."
    paper = "Han, Jayaram, Karbasi, Mirrokni, Woodruff, Zandieh, HyperAttention, ICLR 2024"
    budget_help = (
        "m keys per query: block_size = m/2 exact keys in the query's LSH block, samples = m "
        "uniform residual keys. Exact while n_k < min_seq_len (default 0; the paper's code uses "
        "4096)."
    )
    params = (
        Param("block_size", int, 128, "keys per sorted-LSH block, computed exactly", 1, 2**24),
        Param("samples", int, 256, "residual keys drawn uniformly with replacement (m)", 1, 2**24),
        Param("num_projs", int, 7, "random hyperplanes of the angular LSH (r)", 1, 30),
        PAIRING,
        Param(
            "min_seq_len",
            int,
            0,
            "attention blocks with fewer keys than this are computed exactly (the paper's code: "
            "4096; the default 0 approximates at every length)",
            0,
            2**31,
        ),
    )
    randomized = True
    causal_mode = "decomposition"
    key_set_note = ""  # it returns its key sets
    causal_query_coupled = True  # a full block's queries are sorted into blocks together
    cost_help = (
        "2·(n_q+n_k)·d·r hashing + 2·n_q·(block_size + samples)·(d + d_v) for the block and "
        "sampled products; causal: about the same summed over the log₂(n/min_seq_len) levels."
    )

    @classmethod
    def params_for_budget(cls, budget):
        return {"block_size": max(1, budget // 2), "samples": budget}

    @classmethod
    def params_for_keys(cls, budget):
        # block + samples = m, as kdeformer's
        block = max(1, budget // 3)
        return {"block_size": block, "samples": max(1, budget - block)}

    def keys_per_query(self, n_q, n_k, mask=FULL):
        # below min_seq_len the block is exact (every key); otherwise the block and every sample
        if n_k < self.config["min_seq_len"]:
            return float(n_k)
        return float(min(self.config["block_size"], n_k) + self.config["samples"])

    @classmethod
    def exact_limit(cls, n_q, n_k):
        # One block holds every key, so every sample is masked out; causal: no split at all.
        return {"block_size": n_k}

    def forward_full(self, q, k, v, scale, generator):
        return self.partial(q, k, v, scale, generator, None).out

    def partial(self, q, k, v, scale, generator, query_offset):
        """(lse, output) of non-causal HyperAttention; exact when n_k < min_seq_len."""
        cfg = self.config
        q_scaled = q * scale
        if k.shape[-2] < cfg["min_seq_len"]:
            return exact_partial(q_scaled, k, v)
        return hyper_lse(q_scaled, k, v, *self.draws(q, q_scaled, k, generator))

    def draws(self, q, q_scaled, k, generator):
        """(blocks, sample index (b, h, m)): every random draw of one call, in order."""
        cfg = self.config
        pairing = resolve_pairing(cfg["pairing"], q, k)  # before scaling: K = Q is asked of q
        blocks = sort_into_blocks(
            q_scaled, k, cfg["block_size"], cfg["num_projs"], generator, pairing
        )
        b, h, n_k = k.shape[0], k.shape[1], k.shape[-2]
        index = torch.randint(n_k, (b, h, cfg["samples"]), generator=generator, device=k.device)
        return blocks, index

    def block_sets(self, q, k, v, scale, generator, query_offset):
        """Each query's keys (``kdecli.methods.keyset_calls``): its block's, then the m samples;
        every key below min_seq_len (then exact)."""
        b, h, n_q, _ = q.shape
        n_k = k.shape[-2]
        if n_k < self.config["min_seq_len"]:
            index = torch.arange(n_k, device=k.device).expand(b, h, n_q, n_k)
            return index, torch.ones_like(index, dtype=torch.bool)
        return block_sets(*self.draws(q, q * scale, k, generator))

    def key_sets(self, q, k, v, scale, generator, mask=FULL):
        # the samples stand for n_k/m keys each: an estimate over the set
        return decomposed_key_sets(
            self, q, k, v, scale, generator, mask, exact_over_set=False, cast_full=False
        )

    def log_row_sums(self, q, k, v, scale, generator, mask=FULL):
        # the block's and the scaled samples' row sums merged (and the pieces', causal)
        return decomposed_log_row_sums(self, q, k, v, scale, generator, mask, cast_full=False)

    def causal_leaf(self):
        # Below block_size every piece would be exact anyway (one block holds all its keys), so
        # stop there too: the same result without recursing down to single rows.
        return max(self.config["min_seq_len"], self.config["block_size"])

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        # softmax_part keeps the logits and their exponentials for the block (B) and the samples
        # (m), and each part's output before the merge.
        cfg = self.config
        if n_k < cfg["min_seq_len"]:
            from kdecli.methods.causal import EXACT_CHUNK_ELEMENTS

            return float(3 * itemsize * EXACT_CHUNK_ELEMENTS + b * h * n_q * itemsize * 2 * d_v)
        block, m = min(cfg["block_size"], n_k), cfg["samples"]
        per_query = itemsize * (2 * block + 2 * m + 2 * d + 4 * d_v + 4) + 16
        per_key = itemsize * (2 * d + 2 * d_v) + 16
        return float(b * h * (n_q * per_query + n_k * per_key))

    def flops(self, b, h, n_q, n_k, d, d_v):
        cfg = self.config
        if n_k < cfg["min_seq_len"]:
            return float(b * h * (2 * n_q * n_k * (d + d_v) + n_q * n_k))
        per_key = 2 * (d + d_v) + 1
        keys = min(cfg["block_size"], n_k) + cfg["samples"]
        return float(b * h * (2 * (n_q + n_k) * d * cfg["num_projs"] + n_q * keys * per_key))


def hyper_lse(
    q_scaled: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: SortedBlocks,
    sample_index: torch.Tensor,
) -> Partial:
    """(lse, output) of the module docstring for given blocks and sampled key indices (b, h, m),
    in the original query order.  The in-block mask comes from block ids: (num_blocks × m) per
    slice, never an n × m float mask beyond the logits themselves."""
    n_k, m = k.shape[-2], sample_index.shape[-1]
    q_sorted = blocks.sorted_queries(q_scaled)  # (b, h, nb, bq, d)
    block_logits = q_sorted @ blocks.sorted_keys(k).transpose(-1, -2)  # (b, h, nb, bq, bk)
    excluded = blocks.block_mask(k.device)  # padded keys; aligned: keys outside the window
    if excluded is not None:
        block_logits = block_logits.masked_fill(excluded, float("-inf"))
    lse_block, out_block = softmax_part(block_logits, blocks.sorted_keys(v))

    k_sample = gather_rows(k, sample_index).unsqueeze(2)  # (b, h, 1, m, d)
    sample_logits = q_sorted @ k_sample.transpose(-1, -2)  # (b, h, nb, bq, m)
    in_block = blocks.sample_mask(sample_index)  # (b, h, nb, 1 or bq, m)
    sample_logits = sample_logits.masked_fill(in_block, float("-inf"))
    lse_sample, out_sample = softmax_part(sample_logits, gather_rows(v, sample_index).unsqueeze(2))
    lse_sample = lse_sample + math.log(n_k / m)  # each sample stands for n_k/m keys

    lse, out = merge_lse(lse_block, out_block, lse_sample, out_sample)
    return Partial(blocks.unsort_queries(lse.unsqueeze(-1)).squeeze(-1), blocks.unsort_queries(out))
