"""Thinformer: attend exactly over a kernel-thinned coreset of the key–value pairs.

Carrell, Gong, Shetty, Dwivedi, Mackey, "Low-Rank Thinning", ICML 2025.  With S the coreset:

    Õ_i = Σ_{j∈S} e^{ℓ_ij − c_i} v_j / Σ_{j∈S} e^{ℓ_ij − c_i},   c_i = max_{j∈S} ℓ_ij

S comes from kernel halving with κ((k,v),(k',v')) = e^{s k·k'}·(v·v' + b²), b = max_j ‖v_j‖_∞ (the
authors' choice), evaluated as e^{s k·k' − C} with C = s·max_j ‖k_j‖² so that nothing overflows (the
walk below is invariant to a constant factor on κ).  One halving round of a group walks its points
two at a time, pair t = (x, x'), f_t = κ(x,·) − κ(x',·) and F_tu = ⟨f_t, f_u⟩:

    α_t = Σ_{u<t} η_u F_ut,    a_t = (½ + log(2P/δ))·‖f_t‖·max_{u≤t} ‖f_u‖,
    η_t = +1 (keep x) with probability ½(1 − α_t/a_t), else −1 (keep x')

a self-balancing walk that keeps Σ_kept κ − Σ_dropped κ small; then the whole group's choice is
flipped with probability ½ (symmetrisation), so every point survives a round with probability ½.
Compress-style recursion: T = the number of rounds that makes n_k/2^T closest to the budget; the keys
are cut (in sequence order) into 4^{L−1} contiguous groups, L = min(T, ⌊log₄ n_k⌋); each round halves
every group, and the next round merges groups four by four, so a single group remains after L rounds
(Compress with 2^g·√n_k = n_k/2^L); the remaining T − L rounds halve it further (Compress++'s thinning).
All groups of all slices halve at once; only the walk over pairs is a Python loop.

Any n_k: the published code keeps only the largest power of four of the keys (spread by a stride).
Here groups differ in size by at most one, and a group with an odd count has one point left without a
partner: it is kept with probability ½ (a coin from the generator), like every other point.  No key is
dropped before thinning, and the coreset size can differ from n_k/2^T by a few points.  Exact when no
round runs (the budget is at least about ¾·n_k).

Causal: the shared decomposition (``kdecli.methods.causal``).  The coreset stands for all n_k pairs,
so a full block's row sum is estimated as D̃_i = (n_k/|S|)·Σ_{j∈S} e^{ℓ_ij} (exact when S is every
key).  The coreset depends on keys and values only, never on the queries.

Key sets (``kdecli.methods.keysets``): S for every query (causal: each full block's coreset and
the exact leaves).  As with ``uniform`` the output is softmax over S, but the row sum it stands for
is D̃_i above, so the sets are an estimator's (``exact_over_set`` False), with that
``log_row_sums``.
"""

from __future__ import annotations

import math

import torch

from kdecli.masks import FULL
from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.causal import CAUSAL_BUDGET_HELP, CAUSAL_LEAF, Partial, softmax_part
from kdecli.methods.common import gather_rows, working_dtype
from kdecli.methods.keyset_calls import decomposed_key_sets, decomposed_log_row_sums
from kdecli.methods.registry import register


@register
class Thinformer(AttentionMethod):
    name = "thinformer"
    summary = "Exact attention over a kernel-halving (KH-Compress) coreset of the key–value pairs."
    paper = "Carrell, Gong, Shetty, Dwivedi, Mackey, Low-Rank Thinning, ICML 2025"
    budget_help = (
        "m = target coreset size (`coreset`): T halving rounds with n_k/2^T closest to m; every "
        "query attends to those keys." + CAUSAL_BUDGET_HELP
    )
    params = (
        Param("coreset", int, 256, "target number of key–value pairs kept (m)", 1, 2**24),
        Param(
            "delta",
            float,
            0.5,
            "kernel-halving failure probability δ (sets the walk threshold)",
            1e-12,
            1.0,
        ),
        CAUSAL_LEAF,
    )
    randomized = True
    causal_mode = "decomposition"
    key_set_note = ""  # it returns its key sets
    cost_help = (
        "about 2·(n_k/2^r)·G_r·(d + d_v) kernel entries per halving round r (G_r the group size, "
        "up to 2·m) + 2·n_q·m·(d + d_v) for attention over the coreset."
    )

    @classmethod
    def params_for_budget(cls, budget):
        return {"coreset": budget, "causal_leaf": budget}

    def keys_per_query(self, n_q, n_k, mask=FULL):
        # every query attends to the coreset: n_k / 2^T keys, the size nearest the target m
        return n_k / 2 ** halving_rounds(n_k, self.config["coreset"])

    @classmethod
    def exact_limit(cls, n_q, n_k):
        # n_k/2⁰ is closest to n_k: no halving round, all keys kept (causal: in every full block,
        # whose n_k/2 keys are closer to n_k than n_k/4 is).
        return {"coreset": n_k}

    def forward_full(self, q, k, v, scale, generator):
        in_dtype, work = v.dtype, working_dtype(q.dtype)
        _, out = self.partial(q.to(work), k.to(work), v.to(work), scale, generator, None)
        return out.to(in_dtype)

    def partial(self, q, k, v, scale, generator, query_offset):
        n_k = k.shape[-2]
        index, valid = self.coreset(k, v, scale, generator)
        valid = valid.unsqueeze(-2)
        logits = (q * scale) @ gather_rows(k, index).transpose(-1, -2)
        lse, out = softmax_part(logits.masked_fill(~valid, float("-inf")), gather_rows(v, index))
        kept = valid.sum(-1).to(lse.dtype)  # |S| per slice, (b, h, 1)
        return Partial(lse + torch.log(n_k / kept), out)

    def coreset(self, k, v, scale, generator):
        """(index, valid), (b, h, |S|): the coreset of each slice's key–value pairs."""
        b, h, n_k, d = k.shape
        rounds = halving_rounds(n_k, self.config["coreset"])
        index, valid = thin(
            (k * math.sqrt(scale)).reshape(b * h, n_k, d),
            v.reshape(b * h, n_k, v.shape[-1]),
            rounds,
            self.config["delta"],
            generator,
        )
        return index.view(b, h, -1), valid.view(b, h, -1)

    def block_sets(self, q, k, v, scale, generator, query_offset):
        """Every query reads the coreset (``kdecli.methods.keyset_calls``)."""
        index, valid = self.coreset(k, v, scale, generator)
        shape = (*index.shape[:2], q.shape[-2], index.shape[-1])
        return index.unsqueeze(-2).expand(shape), valid.unsqueeze(-2).expand(shape)

    def key_sets(self, q, k, v, scale, generator, mask=FULL):
        # The output is softmax over the coreset, but the row sum it stands for is
        # (n_k/|S|)·Σ_S e^ℓ (log_row_sums), not the set's own: an estimator, as uniform.
        return decomposed_key_sets(self, q, k, v, scale, generator, mask, exact_over_set=False)

    def log_row_sums(self, q, k, v, scale, generator, mask=FULL):
        return decomposed_log_row_sums(self, q, k, v, scale, generator, mask)

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        # Attention over the coreset (logits and weights per query), the scaled keys, and the
        # kernel rows of one halving round (each point against its group, at most 2·m wide).
        coreset = max(1, n_k // 2 ** halving_rounds(n_k, self.config["coreset"]))
        group = min(n_k, 2 * max(coreset, 1))
        per_query = itemsize * (3 * coreset + d + 2 * d_v)
        per_key = itemsize * (2 * d + d_v + 2 * group) + 32
        return float(b * h * (n_q * per_query + n_k * per_key))

    def flops(self, b, h, n_q, n_k, d, d_v):
        rounds = halving_rounds(n_k, self.config["coreset"])
        levels = compress_levels(n_k, rounds)
        group = n_k / 4 ** (levels - 1) if levels else n_k
        total = 0.0
        for r in range(rounds):
            points = n_k / 2**r
            size = min(group * 2**r, points)
            total += 2 * points * size * (d + d_v + 1)
        return float(b * h * (total + 2 * n_q * (n_k / 2**rounds) * (d + d_v)))


def halving_rounds(n_k: int, budget: int) -> int:
    """T >= 0 with n_k/2^T closest to the budget (ties: fewer rounds), at most ⌊log₂ n_k⌋ so that
    the coreset is never empty."""
    rounds = 0
    while rounds + 1 <= math.log2(n_k) and abs(n_k / 2 ** (rounds + 1) - budget) < abs(
        n_k / 2**rounds - budget
    ):
        rounds += 1
    return rounds


def compress_levels(n_k: int, rounds: int) -> int:
    """L = min(T, ⌊log₄ n_k⌋): rounds that merge groups; the rest halve the single final group."""
    levels = 0
    while levels < rounds and 4 ** (levels + 1) <= n_k:
        levels += 1
    return levels


def thin(
    k_scaled: torch.Tensor,
    v: torch.Tensor,
    rounds: int,
    delta: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coreset of each slice of (k_scaled, v) (S, n, ·): indices (S, G) and a validity mask (S, G).

    ``k_scaled`` is k·√s, so that κ's exponent is a plain dot product.
    """
    slices, n, _ = k_scaled.shape
    levels = compress_levels(n, rounds)
    groups = 4 ** (levels - 1) if levels else 1
    bounds = torch.arange(groups + 1, device=v.device) * n // groups
    index = bounds[:-1, None] + torch.arange(-(-n // groups), device=v.device)  # (groups, longest)
    valid = index < bounds[1:, None]
    index = index.clamp(max=n - 1).expand(slices, -1, -1)
    valid = valid.expand(slices, -1, -1)
    shift = k_scaled.square().sum(-1).amax(-1)  # C = s·max‖k‖², so that e^{s k·k' − C} <= 1
    b_sq = v.abs().amax(dim=(-1, -2)).square()
    for r in range(rounds):
        if r > 0 and index.shape[1] > 1:
            index, valid = _compact(
                index.reshape(slices, -1, 4 * index.shape[2]),
                valid.reshape(slices, -1, 4 * valid.shape[2]),
            )
        index, valid = _halve(k_scaled, v, index, valid, shift, b_sq, delta, generator)
    return index[:, 0], valid[:, 0]


def _compact(index: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each group's valid points to its front (stable) and drop columns no group uses."""
    order = torch.sort((~valid).to(torch.uint8), dim=-1, stable=True).indices
    index, valid = index.gather(-1, order), valid.gather(-1, order)
    width = max(1, int(valid.sum(-1).max()))
    return index[..., :width], valid[..., :width]


def _halve(k_scaled, v, index, valid, shift, b_sq, delta, generator):
    """One kernel-halving round of every group (S, g, G) at once (module docstring)."""
    slices, groups, width = index.shape
    if width % 2:
        index = torch.cat([index, index[..., :1]], dim=-1)
        valid = torch.cat([valid, torch.zeros_like(valid[..., :1])], dim=-1)
    pairs = index.shape[-1] // 2
    flat = index.reshape(slices, -1)
    kx = gather_rows(k_scaled.unsqueeze(1), flat.unsqueeze(1)).view(
        slices, groups, -1, k_scaled.shape[-1]
    )
    vx = gather_rows(v.unsqueeze(1), flat.unsqueeze(1)).view(slices, groups, -1, v.shape[-1])
    kernel = torch.exp(kx @ kx.transpose(-1, -2) - shift.view(-1, 1, 1, 1))
    kernel = kernel * (vx @ vx.transpose(-1, -2) + b_sq.view(-1, 1, 1, 1))
    rows = kernel[..., 0::2, :] - kernel[..., 1::2, :]
    gram = rows[..., 0::2] - rows[..., 1::2]  # F_tu = ⟨f_t, f_u⟩, (S, g, P, P)
    both = valid[..., 1::2]  # a pair with both points (valid counts are prefixes)
    gram = gram * (both.unsqueeze(-1) & both.unsqueeze(-2)).to(gram.dtype)

    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    threshold = (0.5 + math.log(2 * pairs / delta)) * norms * torch.cummax(norms, dim=-1).values
    uniform = torch.rand(
        slices, groups, pairs, generator=generator, device=v.device, dtype=gram.dtype
    )
    keep_first = _walk(gram, (2 * uniform - 1) * threshold)
    flip = torch.rand(slices, groups, 1, generator=generator, device=v.device) < 0.5
    keep_first = keep_first ^ flip  # the coreset or its complement, with probability ½ each

    lone = valid[..., 0::2] & ~both  # the last point of an odd group: kept with probability ½
    coin = torch.rand(slices, groups, pairs, generator=generator, device=v.device) < 0.5
    kept = torch.where(keep_first | lone, index[..., 0::2], index[..., 1::2])
    return _compact(kept, both | (lone & coin))


def _walk(gram: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """The self-balancing walk: η_t = +1 iff draw_t >= α_t, draw_t uniform on [−a_t, a_t], so that
    P(η_t = +1) = ½(1 − α_t/a_t).  Returns η_t = +1 as a boolean (S, g, P)."""
    alpha = torch.zeros_like(draws)  # α for every later pair, updated as signs are chosen
    keep = torch.empty(draws.shape, dtype=torch.bool, device=draws.device)
    for t in range(draws.shape[-1]):
        keep_t = draws[..., t] >= alpha[..., t]
        keep[..., t] = keep_t
        alpha += torch.where(keep_t, 1.0, -1.0).to(alpha.dtype).unsqueeze(-1) * gram[..., t, :]
    return keep
