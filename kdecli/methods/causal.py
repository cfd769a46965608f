"""Causal attention for any method that can return its row sums: the recursive decomposition.

docs/methods.md, after HyperAttention (Han et al., ICLR 2024, section 4).  Under
``Causal(offset)`` query i sits at key position offset + i and sees keys j ≤ offset + i (the base
class has already dropped the keys after offset + n_q − 1, which no query sees, so n_k = offset + n_q).
The keys split in two:

  keys [0, offset)           seen by every query: one *full block*, n_q queries × offset keys, whose
                             query i sits at position offset + i (``query_offset = offset``);
  keys [offset, offset + n_q) the causal square: query i sees its keys 0..i, as in prefill.

The square (n positions, mask j ≤ i) splits at h = n/2 into two causal halves (queries and keys in
[0, h), and in [h, n)) plus one full block (queries in [h, n), keys in [0, h)), every query of which
comes after every key.  The halves recurse until a piece has at most ``leaf`` positions, computed
exactly; the method runs *non-causally* on each full block.  A whole input of at most ``leaf``
positions (offset + n_q ≤ leaf) is one exact piece.  Every piece p returns, per query, a normalised
partial output O_p and its log row sum L_p = log Σ_{j ∈ p} e^{ℓ_ij} (estimated by the method on a
full block), and the pieces merge as

    Õ_i = Σ_p e^{L_p,i} O_p,i / Σ_p e^{L_p,i}          (``merge_lse``, shifted by max_p L_p,i)

With offset = 0 and n_q = n_k (prefill) there is no prefix block and the square is the whole input.
Keys after position offset + i never enter a piece that holds query i, so no future key or value
reaches query i: that is structural, not a property of the method.  (A method that groups the
queries of a full block among themselves, by LSH rank or by segment means, lets the other queries of
that block move query i's estimate; queries are not keys, but in a model a later query depends on
later tokens.  Each such method says so in its module docstring.)

The two halves of every piece are stacked as extra heads, (b, h, n) -> (b, 2h, n/2), so each level
of the recursion is one call of the method, whatever the depth.  An odd piece gets one zero row
appended; in every piece real rows precede appended ones, so under the causal mask an appended key
is never seen by a real query, and the appended query's output is cut off.

The recursion takes the exact pieces as a parameter too (``ExactPiece``): the key sets of a
decomposed call (``kdecli.methods.keyset_calls``) run this very recursion, recording each piece's
keys instead of computing it.

This module knows methods only through what it is handed (``partial``, ``causal_leaf``, ``flops``,
``keys_per_query``); it imports no method class, and ``kdecli.methods.base`` imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from kdecli.masks import FULL, Causal, Mask
from kdecli.methods.common import merge_lse, pad_dim, working_dtype
from kdecli.methods.params import Param

EXACT_CHUNK_ELEMENTS = 2**25  # logits held at once by the chunked exact pieces

CAUSAL_LEAF = Param(
    "causal_leaf",
    int,
    128,
    "causal only: pieces of at most this many positions are computed exactly; the method runs "
    "on the full blocks between them (the recursive decomposition)",
    1,
    2**24,
)
CAUSAL_BUDGET_HELP = (
    " Causal: the budget applies to each full block of the recursive decomposition, and pieces of "
    "at most causal_leaf = m positions are exact."
)


class Partial(NamedTuple):
    """A normalised partial attention and its log row sum: ``out`` (b, h, n_q, d_v) and ``lse``
    (b, h, n_q) = log Σ_j e^{ℓ_ij} over the keys the piece covers (estimated where the method
    estimates it).  A row with no keys has lse = -inf and drops out of ``merge_lse``."""

    lse: torch.Tensor
    out: torch.Tensor


# full_block(q, k, v, query_offset) -> Partial: the method, non-causal, on n_q = n_k positions whose
# queries sit ``query_offset`` positions after its keys (the block's first query at key index
# query_offset, as a position-aware method such as a local band needs to know).
FullBlock = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], Partial]
# exact(q, k, v, mask) -> Partial: an exact piece (a leaf, or a whole input of at most ``leaf``
# positions) under its causal mask; by default ``exact_partial`` of the scaled queries.
ExactPiece = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Mask], Partial]


def causal_by_halves(
    full_block: FullBlock,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    leaf: int,
    exact: ExactPiece | None = None,
) -> Partial:
    """Causal attention (n_q = n_k = n) by the decomposition of the module docstring; ``exact``
    computes the leaves (``ExactPiece``)."""
    b, h, n, _ = q.shape
    if n <= max(1, leaf):
        return exact(q, k, v, Causal(0)) if exact else exact_partial(q * scale, k, v, Causal(0))
    if n % 2:  # an appended zero row is seen only by itself under the causal mask
        lse, out = causal_by_halves(
            full_block, *(pad_dim(x, n + 1) for x in (q, k, v)), scale, leaf, exact
        )
        return Partial(lse[..., :n], out[..., :n, :])
    half = n // 2
    lse_d, out_d = causal_by_halves(
        full_block, *(x.reshape(b, 2 * h, half, x.shape[-1]) for x in (q, k, v)), scale, leaf,
        exact,
    )  # fmt: skip
    lse_d, out_d = lse_d.reshape(b, h, n), out_d.reshape(b, h, n, v.shape[-1])
    lse_low, out_low = full_block(q[..., half:, :], k[..., :half, :], v[..., :half, :], half)
    lse_2, out_2 = merge_lse(lse_d[..., half:], out_d[..., half:, :], lse_low, out_low)
    return Partial(
        torch.cat([lse_d[..., :half], lse_2], dim=-1),
        torch.cat([out_d[..., :half, :], out_2], dim=-2),
    )


def causal_with_offset(
    full_block: FullBlock,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    leaf: int,
    offset: int,
    exact: ExactPiece | None = None,
) -> Partial:
    """Attention under ``Causal(offset)`` with n_k = offset + n_q, by the module docstring: the
    prefix block (keys before the first query's position) merged with the causal square."""
    n_q = q.shape[-2]
    if offset == 0:
        return causal_by_halves(full_block, q, k, v, scale, leaf, exact)
    if offset + n_q <= max(1, leaf):  # the whole input is one exact piece
        if exact:
            return exact(q, k, v, Causal(offset))
        return exact_partial(q * scale, k, v, Causal(offset))
    prefix = full_block(q, k[..., :offset, :], v[..., :offset, :], offset)
    square = causal_by_halves(
        full_block, q, k[..., offset:, :], v[..., offset:, :], scale, leaf, exact
    )
    return Partial(*merge_lse(prefix.lse, prefix.out, square.lse, square.out))


def decomposed_causal(method, q, k, v, scale: float, generator, offset: int = 0) -> torch.Tensor:
    """``method``'s output under ``Causal(offset)`` (n_k = offset + n_q) through the decomposition:
    its ``partial`` (non-causal, with row sums) on every full block, pieces of at most
    ``method.causal_leaf()`` positions exact.  Half-precision inputs are computed in float32 (row
    sums of thousands of keys) and cast back."""
    return decomposed_partial(method, q, k, v, scale, generator, offset).out.to(v.dtype)


def decomposed_partial(method, q, k, v, scale: float, generator, offset: int = 0) -> Partial:
    """``decomposed_causal`` with its merged log row sums, in the working dtype: the lse of a
    decomposed method is the merge of its pieces' (exact leaves, estimated full blocks)."""
    work = working_dtype(q.dtype)

    def full_block(qb, kb, vb, query_offset):
        return method.partial(qb, kb, vb, scale, generator, query_offset)

    q_w, k_w, v_w = q.to(work), k.to(work), v.to(work)
    return causal_with_offset(full_block, q_w, k_w, v_w, scale, method.causal_leaf(), offset)


def exact_causal_flops(b: int, h: int, n_q: int, offset: int, d: int, d_v: int) -> float:
    """Exact attention over the allowed pairs of ``Causal(offset)``: n_q·(offset + (n_q + 1)/2)
    logits, each 2d + 2d_v + 1 operations."""
    return b * h * n_q * (2 * offset + n_q + 1) / 2 * (2 * d + 2 * d_v + 1)


def decomposed_flops(method, b: int, h: int, n: int, d: int, d_v: int, offset: int = 0) -> float:
    """The cost model of ``decomposed_causal`` on n queries under ``Causal(offset)``: the method's
    own cost on the prefix block (n × offset) and summed over the full blocks of every level of
    the square, plus the exact causal leaves (about half of each leaf's logits)."""
    leaf = method.causal_leaf()
    if offset and offset + n <= max(1, leaf):
        return exact_causal_flops(b, h, n, offset, d, d_v)
    total = method.flops(b, h, n, offset, d, d_v) if offset else 0.0
    for pieces, size in full_blocks(n, leaf):
        total += method.flops(b, h * pieces, size, size, d, d_v)
    pieces, size = leaf_count(n, leaf)
    return total + b * h * pieces * size * (size + 1) / 2 * (2 * d + 2 * d_v + 1)


def decomposed_keys_per_query(method, n: int, offset: int = 0) -> float:
    """Keys a query pays for in ``decomposed_causal``, averaged over the n queries: the prefix
    block's non-causal ``keys_per_query`` (n × offset), and at each level of the square the queries
    of the full blocks (half of all positions) pay it on a size × size block; a leaf of s positions
    averages (s + 1)/2 exact keys.  One exact piece: offset + (n + 1)/2."""
    leaf = method.causal_leaf()
    if offset and offset + n <= max(1, leaf):
        return offset + (n + 1) / 2
    pieces, size = leaf_count(n, leaf)
    positions = pieces * size  # n, or a little more where odd pieces were padded
    paid = sum(p * s * method.keys_per_query(s, s) for p, s in full_blocks(n, leaf))
    square = paid / positions + (size + 1) / 2
    return method.keys_per_query(n, offset) + square if offset else square


def decomposition_memory(b: int, h: int, n_q: int, d_v: int, itemsize: int) -> float:
    """Memory the decomposition holds beside one call of the method: the partial outputs and row
    sums of a level, its merge and the stacked halves (4 of each, n_q rows)."""
    return 4 * itemsize * b * h * n_q * (d_v + 1)


def full_blocks(n: int, leaf: int) -> list[tuple[int, int]]:
    """(pieces, size) of the full blocks at each level of the recursion on n positions: the
    method's work, level by level (its cost model sums the method's cost over these)."""
    levels = []
    pieces = 1
    while n > max(1, leaf):
        n += n % 2
        n //= 2
        levels.append((pieces, n))
        pieces *= 2
    return levels


def leaf_count(n: int, leaf: int) -> tuple[int, int]:
    """(pieces, size) of the exact causal leaves of the recursion on n positions: the halves of
    the last level, as large as its full blocks (the whole input when it is one leaf)."""
    levels = full_blocks(n, leaf)
    if not levels:
        return 1, n
    pieces, size = levels[-1]
    return 2 * pieces, size


def softmax_part(logits: torch.Tensor, values: torch.Tensor) -> Partial:
    """(log Σ_j e^{ℓ_j}, softmax(ℓ)·V) over the last axis; a row with every logit -inf gives
    (-inf, 0), so it drops out of ``merge_lse``."""
    c = logits.amax(-1, keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    e = torch.exp(logits - c)
    total = e.sum(-1, keepdim=True)
    out = (e @ values) / torch.where(total > 0, total, torch.ones_like(total))
    return Partial((torch.log(total) + c).squeeze(-1), out)


def exact_partial(q_scaled, k, v, mask: Mask = FULL) -> Partial:
    """Exact (lse, output) under ``mask`` in query chunks, never holding all n_q × n_k logits at
    once.  Under ``Causal(offset)`` a chunk of queries [start, stop) reads only the keys up to
    offset + stop − 1."""
    b, h, n_q, _ = q_scaled.shape
    n_k = k.shape[-2]
    step = max(1, EXACT_CHUNK_ELEMENTS // max(1, b * h * n_k))
    lses, outs = [], []
    for start in range(0, n_q, step):
        stop = min(n_q, start + step)
        keys = min(n_k, mask.offset + stop) if mask.is_causal else n_k
        logits = q_scaled[..., start:stop, :] @ k[..., :keys, :].transpose(-1, -2)
        if mask.is_causal:
            allowed = mask.rows(start).allowed(stop - start, keys, device=k.device)
            logits = logits.masked_fill(~allowed, float("-inf"))
        lse, out = softmax_part(logits, v[..., :keys, :])
        lses.append(lse)
        outs.append(out)
    return Partial(torch.cat(lses, dim=-1), torch.cat(outs, dim=-2))
