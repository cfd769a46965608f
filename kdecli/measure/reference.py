"""Exact softmax attention in float64, in query chunks, never holding an n_q × n_k matrix.

For one slice, with logits ℓ = s·QKᵀ, P = D⁻¹A = softmax(ℓ) row by row and O = PV.  Each chunk of
queries holds ``chunk × n_k`` logits; rows are normalised with their own max (a log-sum-exp), so
nothing overflows.  The same chunked P also gives the column norms of D⁻¹A (KDEformer's oracle
probabilities) and ‖D⁻¹A‖₂ by a matrix-free power iteration.

Every function takes the mask (``kdecli.masks``, docs/methods.md): under ``Causal(offset)`` query
i sits at key position offset + i and its row of P is the softmax over keys j ≤ offset + i.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from kdecli.masks import FULL, Mask

DEFAULT_MEMORY_BYTES = 256 * 2**20


def chunk_rows(batch_heads: int, n_k: int, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> int:
    """Queries per chunk so that the float64 logits of one chunk fit in ``memory_bytes``.

    A chunk needs about three n_k-wide float64 buffers per query (logits, exp, a temporary).
    """
    per_query = 3 * 8 * max(1, batch_heads) * max(1, n_k)
    return max(1, memory_bytes // per_query)


def iter_softmax_chunks(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    *,
    mask: Mask = FULL,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    positions: torch.Tensor | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, stop, P[..., start:stop, :]) in float64, P = softmax(s·QKᵀ) under ``mask``.

    ``positions`` (n_q,) are the queries' row indices when ``q`` holds some rows of a longer query
    sequence (a row sample): row r sits at key position offset + positions[r]; by default query i
    sits at offset + i.
    """
    q64, k64 = q.to(torch.float64), k.to(torch.float64)
    b, h, n_q, _ = q.shape
    n_k = k.shape[-2]
    step = chunk_rows(b * h, n_k, memory_bytes)
    k_t = k64.transpose(-1, -2)
    for start in range(0, n_q, step):
        stop = min(n_q, start + step)
        logits = (q64[..., start:stop, :] * scale) @ k_t
        if mask.is_causal:
            rows = torch.arange(start, stop, device=q.device)
            rows = rows if positions is None else positions[start:stop].to(q.device)
            rows = (rows + mask.offset).unsqueeze(-1)
            cols = torch.arange(n_k, device=q.device)
            logits.masked_fill_(cols > rows, float("-inf"))
        logits -= logits.amax(-1, keepdim=True)
        logits.exp_()
        logits /= logits.sum(-1, keepdim=True)
        yield start, stop, logits


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    mask: Mask = FULL,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(s·QKᵀ)V under ``mask`` in float64, (b, h, n_q, d_v); ``positions`` as in
    ``iter_softmax_chunks``."""
    v64 = v.to(torch.float64)
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=torch.float64, device=q.device)
    for start, stop, probs in iter_softmax_chunks(
        q, k, scale, mask=mask, memory_bytes=memory_bytes, positions=positions
    ):
        out[..., start:stop, :] = probs @ v64
    return out


def attention_column_sq_norms(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    *,
    mask: Mask = FULL,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> torch.Tensor:
    """‖(D⁻¹A)_{:,j}‖₂² for every key j under ``mask``: (b, h, n_k) float64."""
    total = torch.zeros(*k.shape[:-1], dtype=torch.float64, device=k.device)
    for _, _, probs in iter_softmax_chunks(q, k, scale, mask=mask, memory_bytes=memory_bytes):
        total += probs.square().sum(-2)
    return total


def attention_spectral_norm(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    *,
    mask: Mask = FULL,
    iterations: int = 30,
    tol: float = 1e-7,
    generator: torch.Generator | None = None,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> torch.Tensor:
    """‖D⁻¹A‖₂ per slice under ``mask``, (b, h) float64, by power iteration on (D⁻¹A)ᵀ(D⁻¹A).

    Each iteration is one chunked pass: y = P x chunk by chunk, z += P_chunkᵀ y_chunk.  Power
    iteration approaches the top singular value from below; it stops when every slice's estimate
    moves by less than ``tol`` (relative).
    """
    b, h, n_k = k.shape[:-1]
    x = torch.rand(b, h, n_k, 1, dtype=torch.float64, generator=generator).to(k.device) + 0.5
    x /= x.norm(dim=-2, keepdim=True)
    sigma = torch.zeros(b, h, dtype=torch.float64, device=k.device)
    for _ in range(iterations):
        z = torch.zeros_like(x)
        for _, _, probs in iter_softmax_chunks(q, k, scale, mask=mask, memory_bytes=memory_bytes):
            z += probs.transpose(-1, -2) @ (probs @ x)
        norm = z.norm(dim=-2, keepdim=True)
        new_sigma = norm.squeeze(-1).squeeze(-1).sqrt()
        x = z / norm
        converged = torch.all((new_sigma - sigma).abs() <= tol * new_sigma)
        sigma = new_sigma
        if bool(converged):
            break
    return sigma


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)
