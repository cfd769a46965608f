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

Pairing (``pairing``, docs/methods.md): ``rank`` gives the t-th block of sorted queries the t-th
block of sorted keys (the released code: right when Q and K hash alike); ``aligned`` gives it the B
sorted keys around the position of its queries' ranks among the key ranks (``AlignedBlocks``),
the same number of keys at the same cost; ``auto`` (default) takes rank when K = Q and aligned
otherwise, as measured: aligned lowered the error 11–15 % on MiniLM's heads and raised it
10–12 % on GloVe's K = Q at budgets 64–512 (benchmarks/bench_pairing.py).

Causal: the shared decomposition (``kdecli.methods.causal``) with L_i = log N_i[d_v] + c_i, the
estimated row sum D̃_i.  Queries of a full block are sorted among themselves, so a later query can
move an earlier one's block (never a later key into it).

Key sets (``kdecli.methods.keysets``): block(i) ∪ {π_t}, the keys N_i reads, over which it
estimates (``exact_over_set`` False); causal, over every piece (``kdecli.methods.keyset_calls``).
``log_row_sums``: log D̃_i, merged over the pieces under a causal mask.
"""

from __future__ import annotations

import torch

from kdecli.masks import FULL
from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.causal import CAUSAL_BUDGET_HELP, CAUSAL_LEAF, Partial
from kdecli.methods.common import gather_rows, needs_grad, with_ones_column, working_dtype
from kdecli.methods.keyset_calls import decomposed_key_sets, decomposed_log_row_sums
from kdecli.methods.lsh import (
    PAIRING,
    SortedBlocks,
    block_sets,
    resolve_pairing,
    sort_into_blocks,
)
from kdecli.methods.registry import register

SAMPLINGS = ("value-norm", "uniform", "column-norm")


@register
class KDEformer(AttentionMethod):
    name = "kdeformer"
    summary = "Sorted angular-LSH blocks computed exactly + importance-sampled residual keys."
    paper = "Zandieh, Han, Daliri, Karbasi, KDEformer, ICML 2023"
    budget_help = (
        "m keys per query: block_size = m/2 exact keys in the query's LSH block, samples = m "
        "residual keys (the paper's GloVe figure labels this 1.5m)." + CAUSAL_BUDGET_HELP
    )
    params = (
        Param("block_size", int, 128, "keys per sorted-LSH block, computed exactly", 1, 2**24),
        Param("samples", int, 256, "residual keys drawn with replacement (m)", 1, 2**24),
        Param("num_projs", int, 7, "random hyperplanes of the angular LSH (r)", 1, 30),
        PAIRING,
        Param(
            "sampling",
            str,
            "value-norm",
            "residual probabilities: value-norm (released code), uniform, or column-norm "
            "(the paper's squared column norms of D⁻¹A, an O(n²d) oracle)",
            choices=SAMPLINGS,
        ),
        CAUSAL_LEAF,
    )
    randomized = True
    causal_mode = "decomposition"
    key_set_note = ""  # it returns its key sets
    causal_query_coupled = True  # a full block's queries are sorted into blocks together
    cost_help = (
        "2·(n_q+n_k)·d·r hashing + 2·n_q·(block_size + samples)·(d + d_v + 1) for the block and "
        "sampled products."
    )

    @classmethod
    def params_for_budget(cls, budget):
        return {"block_size": max(1, budget // 2), "samples": budget, "causal_leaf": budget}

    @classmethod
    def params_for_keys(cls, budget):
        # block + samples = m, a third in the block as in the paper's m/2 : m
        block = max(1, budget // 3)
        return {"block_size": block, "samples": max(1, budget - block), "causal_leaf": budget}

    def keys_per_query(self, n_q, n_k, mask=FULL):
        # A query computes its whole block and every sample (an in-block sample is masked, not
        # skipped), so it pays block + samples even where that exceeds n_k.
        return float(min(self.config["block_size"], n_k) + self.config["samples"])

    @classmethod
    def exact_limit(cls, n_q, n_k):
        # One block holds every key: the block sum is the whole row, every sample is masked out.
        # Causal: every full block is smaller than n_k, so one block holds its keys too.
        return {"block_size": n_k}

    def grad_reasons(self):
        if self.config["sampling"] == "column-norm":
            return ["sampling=column-norm (an O(n²d) oracle) has no backward pass"]
        return []

    def forward_full(self, q, k, v, scale, generator):
        numerator, denominator, _, blocks = self._estimate(q, k, v, scale, generator)
        if needs_grad(q, k, v):
            return blocks.unsort_queries(numerator / denominator.unsqueeze(-1))
        return blocks.unsort_queries(numerator.div_(denominator.unsqueeze(-1)))

    def partial(self, q, k, v, scale, generator, query_offset):
        numerator, denominator, shift, blocks = self._estimate(q, k, v, scale, generator)
        out = blocks.unsort_queries(numerator / denominator.unsqueeze(-1))
        lse = torch.log(denominator) + shift  # log D̃_i = log N_i[d_v] + c_i
        return Partial(blocks.unsort_queries(lse.unsqueeze(-1)).squeeze(-1), out)

    def _estimate(self, q, k, v, scale, generator):
        blocks, sample_index, sample_weight = self.draws(q, k, v, scale, generator)
        numerator, denominator, shift = sorted_estimate(
            q, k, v, scale, blocks, sample_index, sample_weight
        )
        return numerator, denominator, shift, blocks

    def draws(self, q, k, v, scale, generator):
        """(blocks, sample index, sample weight): every random draw of one call, in order."""
        cfg = self.config
        pairing = resolve_pairing(cfg["pairing"], q, k)
        blocks = sort_into_blocks(q, k, cfg["block_size"], cfg["num_projs"], generator, pairing)
        return (blocks, *self.draw_samples(q, k, v, scale, generator))

    def block_sets(self, q, k, v, scale, generator, query_offset):
        """Each query's keys (``kdecli.methods.keyset_calls``): its block's, then the m samples
        (those in its block already counted there)."""
        blocks, sample_index, _ = self.draws(q, k, v, scale, generator)
        return block_sets(blocks, sample_index)

    def key_sets(self, q, k, v, scale, generator, mask=FULL):
        # the samples are importance-weighted: an estimate over the set; a plain call runs in
        # the inputs' own dtype (forward_full), the decomposition in the working one
        return decomposed_key_sets(
            self, q, k, v, scale, generator, mask, exact_over_set=False, cast_full=False
        )

    def log_row_sums(self, q, k, v, scale, generator, mask=FULL):
        # log N_i[d_v] + c_i of each piece, merged under a causal mask
        return decomposed_log_row_sums(self, q, k, v, scale, generator, mask, cast_full=False)

    def draw_samples(self, q, k, v, scale, generator):
        """m key indices per slice, drawn with replacement, and their weights 1/(m·p)."""
        b, h, n_k, _ = v.shape
        m = self.config["samples"]
        probs = sampling_probabilities(self.config["sampling"], q, k, v, scale)
        flat = probs.reshape(b * h, n_k)
        index = torch.multinomial(flat, m, replacement=True, generator=generator).view(b, h, m)
        weight = 1.0 / (m * torch.gather(probs, -1, index))
        return index, weight.to(v.dtype)

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        # Per query: its block's logits (B), the sample logits (m), the sorted copy, the
        # numerator; per key: sorted keys and values, the probabilities; int64 sort orders.
        cfg = self.config
        block, m = min(cfg["block_size"], n_k), cfg["samples"]
        per_query = itemsize * (block + m + 2 * d + 2 * d_v + 4) + 16
        per_key = itemsize * (2 * d + 2 * d_v + 4) + 16
        return float(b * h * (n_q * per_query + n_k * per_key))

    def flops(self, b, h, n_q, n_k, d, d_v):
        cfg = self.config
        per_key = 2 * (d + d_v + 1) + 1
        return float(
            b
            * h
            * (
                2 * (n_q + n_k) * d * cfg["num_projs"]
                + n_q * (min(cfg["block_size"], n_k) + cfg["samples"]) * per_key
            )
        )


def sampling_probabilities(kind: str, q, k, v, scale) -> torch.Tensor:
    """Residual key probabilities p (b, h, n_k), each slice summing to one.

    value-norm:  p_j ∝ ‖ṽ_j‖₂ / ‖Ṽ‖₂² + 1/n_k with ṽ_j = (v_j, 1) (the released code).  ‖ṽ_j‖² =
                 ‖v_j‖² + 1, and ‖Ṽ‖₂² is the top eigenvalue of ṼᵀṼ = [[VᵀV, Vᵀ1], [1ᵀV, n_k]],
                 exact and cheaper than a power iteration, without building Ṽ.
    uniform:     p_j = 1/n_k
    column-norm: p_j ∝ ‖(D⁻¹A)_{:,j}‖₂², computed exactly in query chunks (an oracle).
    """
    n_k = v.shape[-2]
    v = v.to(working_dtype(v.dtype))  # eigvalsh and multinomial need float32 or wider
    if kind == "uniform":
        return v.new_full(v.shape[:-1], 1.0 / n_k)
    if kind == "value-norm":
        column_sums = v.sum(-2, keepdim=True)  # 1ᵀV: (b, h, 1, d_v)
        corner = torch.full_like(column_sums[..., :1], float(n_k))
        gram = torch.cat(
            [
                torch.cat([v.transpose(-1, -2) @ v, column_sums.transpose(-1, -2)], dim=-1),
                torch.cat([column_sums, corner], dim=-1),
            ],
            dim=-2,
        )
        spectral_sq = torch.linalg.eigvalsh(gram)[..., -1:]
        aug_norms = torch.sqrt(v.square().sum(-1) + 1)  # ‖(v_j, 1)‖₂
        weights = aug_norms / spectral_sq + 1.0 / n_k
    elif kind == "column-norm":
        from kdecli.measure.reference import attention_column_sq_norms

        weights = attention_column_sq_norms(q, k, scale).to(v.dtype)
    else:  # Param.choices already rejects anything else
        raise AssertionError(kind)
    return weights / weights.sum(-1, keepdim=True)


def sorted_estimate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    blocks: SortedBlocks,
    sample_index: torch.Tensor,
    sample_weight: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N_i split into its value part and its last (row-sum) column, in sorted query order.

    Returns (numerator (b, h, nb·bq, d_v), denominator (b, h, nb·bq), c (b, h, nb·bq)), c the
    shift both are computed under; rows past n_q are padding.
    ``shift`` (b, h, n_q) fixes c_i (tests use zero to read unshifted sums); by default c_i is the
    largest logit that query's estimate uses.  The in-block mask is built from block ids, one
    (num_blocks × m) boolean per slice, never an n × m matrix.  Under autograd (``needs_grad``)
    the same arithmetic runs out of place, and the shift is taken without its gradient (it
    cancels in the ratio, so its derivative adds nothing but work).
    """
    b, h = q.shape[:2]
    nb, bq = blocks.num_blocks, blocks.query_block
    inplace = not needs_grad(q, k, v, sample_weight)
    q_sorted = blocks.sorted_queries(q)  # (b, h, nb, bq, d): scaled after the copy
    q_sorted = q_sorted.mul_(scale) if inplace else q_sorted * scale
    block_logits = q_sorted @ blocks.sorted_keys(k).transpose(-1, -2)  # (b, h, nb, bq, bk)
    excluded = blocks.block_mask(k.device)  # padded keys; with aligned pairing, keys outside
    if excluded is not None:  # the query's own window.  A matmul's output: its backward does
        block_logits.masked_fill_(excluded, float("-inf"))  # not read it, so in place is safe

    # One (nb·bq × d) @ (d × m) product per slice for the samples, viewed per block for the mask.
    k_sample = gather_rows(k, sample_index)  # (b, h, m, d)
    v_sample = with_ones_column(gather_rows(v, sample_index)).mul_(sample_weight.unsqueeze(-1))
    sample_logits = q_sorted.view(b, h, nb * bq, -1) @ k_sample.transpose(-1, -2)
    sample_logits = sample_logits.view(b, h, nb, bq, -1)
    sample_logits.masked_fill_(blocks.sample_mask(sample_index), float("-inf"))

    if shift is None:
        c = torch.maximum(block_logits.amax(-1), sample_logits.amax(-1)).unsqueeze(-1).detach()
    else:
        c = blocks.sorted_queries(shift.unsqueeze(-1))
    if inplace:
        block_weights = block_logits.sub_(c).exp_()
        sample_weights = sample_logits.sub_(c).exp_().view(b * h, nb * bq, -1)
    else:
        block_weights = torch.exp(block_logits - c)
        sample_weights = torch.exp(sample_logits - c).view(b * h, nb * bq, -1)
    sampled = torch.bmm(sample_weights, v_sample.view(b * h, *v_sample.shape[-2:]))
    d_v = v.shape[-1]
    numerator = (block_weights @ blocks.sorted_keys(v)).view(b, h, nb * bq, d_v)
    numerator += sampled[..., :d_v].view(b, h, nb * bq, d_v)
    denominator = block_weights.sum(-1).view(b, h, nb * bq) + sampled[..., d_v].view(b, h, nb * bq)
    return numerator, denominator, c.view(b, h, nb * bq)


def kdeformer_numerator(q, k, v, scale, blocks, sample_index, sample_weight, shift=None):
    """(N_i[:d_v], N_i[d_v]) of the module docstring in the original query order (for tests)."""
    numerator, denominator, _ = sorted_estimate(
        q, k, v, scale, blocks, sample_index, sample_weight, shift
    )
    return blocks.unsort_queries(numerator), blocks.unsort_queries(denominator.unsqueeze(-1))[
        ..., 0
    ]
