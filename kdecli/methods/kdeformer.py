"""KDEformer: sorted-LSH blocks computed exactly plus an importance-sampled residual.

Zandieh, Han, Daliri, Karbasi, "KDEformer: Accelerating Transformers via Kernel Density
Estimation", ICML 2023.  The practical algorithm of the released code, without its defects:

    ṽ_j = (v_j, 1)                                    (the last column estimates the row sum D_i)
    N_i = Σ_{j ∈ block(i)} e^{ℓ_ij − c_i} ṽ_j
        + Σ_{t ≤ m} [block(π_t) ≠ block(i)] · e^{ℓ_iπ_t − c_i} ṽ_{π_t} / (m·p_{π_t})
    Õ_i = N_i[:d_v] / N_i[d_v]

Blocks come from sorting queries and keys by angular-LSH rank (``kdecli.methods.lsh``); π_t are m
keys drawn with replacement from p.  The residual is an unbiased estimate of the off-block sum, and
the shift c_i (the largest logit the estimate uses) cancels in the ratio but keeps exp finite.
Exact when one block holds every key (block_size >= n_k).
"""

from __future__ import annotations

import torch

from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.common import gather_rows, with_ones_column
from kdecli.methods.lsh import SortedBlocks, sort_into_blocks
from kdecli.methods.registry import register

SAMPLINGS = ("value-norm", "uniform", "column-norm")


@register
class KDEformer(AttentionMethod):
    name = "kdeformer"
    summary = "Sorted angular-LSH blocks computed exactly + importance-sampled residual keys."
    paper = "Zandieh, Han, Daliri, Karbasi, KDEformer, ICML 2023"
    budget_help = (
        "m keys per query: block_size = m/2 exact keys in the query's LSH block, samples = m "
        "residual keys (the paper's GloVe figure labels this 1.5m)."
    )
    params = (
        Param("block_size", int, 128, "keys per sorted-LSH block, computed exactly", 1, 2**24),
        Param("samples", int, 256, "residual keys drawn with replacement (m)", 1, 2**24),
        Param("num_projs", int, 7, "random hyperplanes of the angular LSH (r)", 1, 30),
        Param(
            "sampling", str, "value-norm",
            "residual probabilities: value-norm (released code), uniform, or column-norm "
            "(the paper's squared column norms of D⁻¹A, an O(n²d) oracle)",
            choices=SAMPLINGS,
        ),
    )
    randomized = True
    cost_help = (
        "2·(n_q+n_k)·d·r hashing + 2·n_q·(block_size + samples)·(d + d_v + 1) for the block and "
        "sampled products."
    )

    @classmethod
    def params_for_budget(cls, budget):
        return {"block_size": max(1, budget // 2), "samples": budget}

    def forward(self, q, k, v, scale, generator, causal):
        cfg = self.config
        blocks = sort_into_blocks(q, k, cfg["block_size"], cfg["num_projs"], generator)
        v_aug = with_ones_column(v)
        sample_index, sample_weight = self.draw_samples(q, k, v_aug, scale, generator)
        numerator = kdeformer_numerator(q * scale, k, v_aug, blocks, sample_index, sample_weight)
        return numerator[..., :-1] / numerator[..., -1:]

    def draw_samples(self, q, k, v_aug, scale, generator):
        """m key indices per slice, drawn with replacement, and their weights 1/(m·p)."""
        b, h, n_k, _ = v_aug.shape
        m = self.config["samples"]
        probs = sampling_probabilities(self.config["sampling"], q, k, v_aug, scale)
        flat = probs.reshape(b * h, n_k)
        index = torch.multinomial(flat, m, replacement=True, generator=generator).view(b, h, m)
        weight = 1.0 / (m * torch.gather(probs, -1, index))
        return index, weight.to(v_aug.dtype)

    def flops(self, b, h, n_q, n_k, d, d_v):
        cfg = self.config
        per_key = 2 * (d + d_v + 1) + 1
        return float(
            b * h * (2 * (n_q + n_k) * d * cfg["num_projs"]
                     + n_q * (min(cfg["block_size"], n_k) + cfg["samples"]) * per_key)
        )


def sampling_probabilities(kind: str, q, k, v_aug, scale) -> torch.Tensor:
    """Residual key probabilities p (b, h, n_k), each slice summing to one.

    value-norm:  p_j ∝ ‖ṽ_j‖₂ / ‖Ṽ‖₂² + 1/n_k   (the released code; ‖Ṽ‖₂ exactly, from the
                 (d_v+1)×(d_v+1) Gram matrix, cheaper than a power iteration)
    uniform:     p_j = 1/n_k
    column-norm: p_j ∝ ‖(D⁻¹A)_{:,j}‖₂², computed exactly in query chunks (an oracle).
    """
    n_k = v_aug.shape[-2]
    if v_aug.dtype in (torch.float16, torch.bfloat16):  # eigvalsh and multinomial need float32+
        v_aug = v_aug.float()
    if kind == "uniform":
        return v_aug.new_full(v_aug.shape[:-1], 1.0 / n_k)
    if kind == "value-norm":
        gram = v_aug.transpose(-1, -2) @ v_aug
        spectral_sq = torch.linalg.eigvalsh(gram)[..., -1:]
        weights = v_aug.norm(dim=-1) / spectral_sq + 1.0 / n_k
    elif kind == "column-norm":
        from kdecli.reference import attention_column_sq_norms

        weights = attention_column_sq_norms(q, k, scale).to(v_aug.dtype)
    else:  # Param.choices already rejects anything else
        raise AssertionError(kind)
    return weights / weights.sum(-1, keepdim=True)


def kdeformer_numerator(
    q_scaled: torch.Tensor, k: torch.Tensor, v_aug: torch.Tensor, blocks: SortedBlocks,
    sample_index: torch.Tensor, sample_weight: torch.Tensor, shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """N_i of the module docstring for every query, in the original query order: (b, h, n_q, d_v+1).

    ``shift`` (b, h, n_q) fixes c_i (tests use zero to read unshifted sums); by default c_i is the
    largest logit that query's estimate uses.  The in-block mask is built from block ids, one
    (num_blocks × m) boolean per slice, never an n × m matrix.
    """
    b, h = q_scaled.shape[:2]
    nb, bq = blocks.num_blocks, blocks.query_block
    q_sorted = blocks.sorted_queries(q_scaled)  # (b, h, nb, bq, d)
    block_logits = q_sorted @ blocks.sorted_keys(k).transpose(-1, -2)  # (b, h, nb, bq, bk)
    key_valid = blocks.key_valid(k.device)
    if key_valid is not None:  # padded keys (only in the last block) contribute nothing
        block_logits.masked_fill_(~key_valid[:, None, :], float("-inf"))

    # One (nb·bq × d) @ (d × m) product per slice for the samples, viewed per block for the mask.
    k_sample = gather_rows(k, sample_index)  # (b, h, m, d)
    v_sample = gather_rows(v_aug, sample_index) * sample_weight.unsqueeze(-1)
    sample_logits = q_sorted.view(b, h, nb * bq, -1) @ k_sample.transpose(-1, -2)
    sample_logits = sample_logits.view(b, h, nb, bq, -1)
    sample_logits.masked_fill_(blocks.samples_in_block(sample_index).unsqueeze(3), float("-inf"))

    if shift is None:
        c = torch.maximum(block_logits.amax(-1), sample_logits.amax(-1)).unsqueeze(-1)
    else:
        c = blocks.sorted_queries(shift.unsqueeze(-1))
    numerator = block_logits.sub_(c).exp_() @ blocks.sorted_keys(v_aug)
    sample_weights = sample_logits.sub_(c).exp_().view(b, h, nb * bq, -1)
    numerator = numerator.view(b, h, nb * bq, -1) + sample_weights @ v_sample
    return blocks.unsort_queries(numerator)
