"""Oracles: the best any sparse (`topk`) or low-rank (`rankk`) method with budget m could do.

Both read the exact attention matrix, so they cost as much as exact attention or more: analysis only,
never a speed-up.  Each refuses inputs above ``max_n`` (a parameter) instead of running for hours.

topk:   Õ_i = Σ_{j∈T_i} e^{ℓ_ij − c_i} v_j / Σ_{j∈T_i} e^{ℓ_ij − c_i}, T_i = the m largest logits of
        query i (among j ≤ offset + i under Causal(offset)), c_i = max_j ℓ_ij.  Computed in query chunks, so memory is
        O(chunk·n_k): it runs wherever the float64 reference runs.  Exact when m >= n_k.
        Its key sets (``key_sets``) are the T_i, from the same chunks and the same top-m.
rankk:  Õ = P_m V with P = D⁻¹A and P_m its best rank-m approximation (truncated SVD; Eckart–Young,
        in both the spectral and the Frobenius norm).  P is formed per slice in float64.  When
        n_q <= n_k, P_m = U_m U_mᵀ P so Õ = U_m (U_mᵀ O) with U_m the top eigenvectors of P Pᵀ;
        otherwise P_m = P W_m W_mᵀ with W_m those of PᵀP: an eigh of the smaller Gram matrix, faster
        than an SVD of P.  Exact when m >= min(n_q, n_k).  A rank-m approximation of a causal
        matrix is not causal (query 0 would see later keys), so causal rankk runs through the
        shared decomposition (``kdecli.methods.causal``): the best rank-m approximation of each
        full block, with the block's exact row sums, and exact causal leaves — the ceiling of a
        low-rank method inside that decomposition.  The rank-m factor of a full block mixes its
        queries, so a later query moves an earlier one's estimate (never a later key into it).
"""

from __future__ import annotations

import torch

from kdecli.masks import FULL
from kdecli.measure.reference import chunk_rows, iter_softmax_chunks
from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.causal import CAUSAL_BUDGET_HELP, CAUSAL_LEAF, Partial
from kdecli.methods.common import working_dtype
from kdecli.methods.keyset_calls import Call, in_forward_chunks
from kdecli.methods.keysets import KeySets
from kdecli.methods.registry import register


def _too_large(method: str, n_q: int, n_k: int, limit: int, why: str) -> list[str]:
    if max(n_q, n_k) <= limit:
        return []
    return [
        f"{method} is an oracle limited to n_q, n_k <= max_n={limit} ({why}); got n_q={n_q}, "
        f"n_k={n_k}. Raise the limit with `--param max_n={max(n_q, n_k)}` if you can afford it."
    ]


@register
class TopK(AttentionMethod):
    name = "topk"
    summary = "Oracle: each query keeps its exact top-m logits (the ceiling of sparse methods)."
    paper = "oracle (the ceiling of any method reading m keys per query)"
    budget_help = "m = keys kept per query (`keys`)."
    params = (
        Param("keys", int, 256, "largest logits kept per query (m)", 1, 2**24),
        Param("max_n", int, 131072, "refuse inputs with n_q or n_k above this", 1, 2**24),
    )
    role = "oracle"
    supports_causal = True
    key_set_note = ""  # it returns its key sets
    cost_help = "like exact attention: 2·n_q·n_k·(d + d_v) plus a top-m per query (O(n²) oracle)."

    @classmethod
    def params_for_budget(cls, budget):
        return {"keys": budget}

    def keys_per_query(self, n_q, n_k, mask=FULL):
        # the m keys kept (an oracle: finding them reads every logit, as its flops say)
        return float(min(self.config["keys"], n_k))

    @classmethod
    def exact_limit(cls, n_q, n_k):
        return {"keys": n_k}  # keeping every key's logit is the full softmax

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        # One chunk of logits at a time (chunk_rows' budget), its copy with the kept entries and
        # the softmax, plus the output.
        from kdecli.measure.reference import DEFAULT_MEMORY_BYTES

        return float(2 * DEFAULT_MEMORY_BYTES + b * h * itemsize * n_q * d_v)

    def input_reasons(self, n_q, n_k, d, d_v, mask):
        return _too_large("topk", n_q, n_k, self.config["max_n"], "it reads all n_q·n_k logits")

    def forward_full(self, q, k, v, scale, generator):
        return self.top_m(q, k, v, scale, FULL)

    def forward_causal(self, q, k, v, scale, generator, mask):
        return self.top_m(q, k, v, scale, mask)

    def top_m(self, q, k, v, scale, mask):
        """Softmax over each query's m largest logits among the keys ``mask`` lets it see."""
        work = working_dtype(q.dtype)
        qw, kw, vw = q.to(work), k.to(work), v.to(work)
        b, h, n_q, _ = q.shape
        out = torch.empty(b, h, n_q, v.shape[-1], dtype=work, device=q.device)
        step = chunk_rows(b * h, k.shape[-2])
        for start in range(0, n_q, step):
            stop = min(n_q, start + step)
            logits, top, _ = self.top_chunk(qw, kw, scale, mask, start, stop)
            kept = torch.full_like(logits, float("-inf")).scatter_(-1, top, logits.gather(-1, top))
            out[..., start:stop, :] = torch.softmax(kept, dim=-1) @ vw
        return out.to(v.dtype)

    def top_chunk(self, qw, kw, scale, mask, start, stop):
        """(logits, top, allowed) of queries [start, stop): their logits (masked keys −inf), the
        indices of the m largest, and the allowed pairs (None: all).  A causal row with fewer
        than m keys keeps −inf entries, which weigh nothing and are no key of its set; ties at
        the m-th value are broken by topk, so exactly m are kept."""
        n_k = kw.shape[-2]
        logits = (qw[..., start:stop, :] * scale) @ kw.transpose(-1, -2)
        allowed = mask.rows(start).allowed(stop - start, n_k, device=qw.device)
        if allowed is not None:
            logits.masked_fill_(~allowed, float("-inf"))
        top = torch.topk(logits, min(self.config["keys"], n_k), dim=-1).indices
        return logits, top, allowed

    def key_sets(self, q, k, v, scale, generator, mask=FULL):
        # the forward's chunks, products and top-m: its m keys, less the masked ones
        call = Call.of(self, q, k, v, mask)
        work = working_dtype(q.dtype)
        qw, kw = q.to(work), call.k.to(work)
        b, h, n_q, _ = q.shape
        n_k = kw.shape[-2]

        def chunk(start, stop):
            logits, top, allowed = self.top_chunk(qw, kw, scale, call.mask, start, stop)
            read = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)
            return read if allowed is None else read & allowed

        rows = in_forward_chunks(n_q, chunk_rows(b * h, n_k), chunk)
        return call.widened(KeySets(n_q, n_k, rows))

    def flops(self, b, h, n_q, n_k, d, d_v):
        return float(b * h * (2 * n_q * n_k * (d + d_v) + 2 * n_q * n_k))


@register
class RankK(AttentionMethod):
    name = "rankk"
    summary = "Oracle: best rank-m approximation of D⁻¹A times V (the ceiling of low-rank methods)."
    paper = "oracle (Eckart–Young: the ceiling of any rank-m method)"
    budget_help = "m = rank kept (`rank`)." + CAUSAL_BUDGET_HELP
    params = (
        Param("rank", int, 256, "rank of the truncated SVD of D⁻¹A (m)", 1, 2**24),
        Param("max_n", int, 8192, "refuse inputs with n_q or n_k above this", 1, 2**20),
        CAUSAL_LEAF,
    )
    role = "oracle"
    causal_mode = "decomposition"
    key_set_note = "a low-rank oracle: its rank-m factor of D⁻¹A weighs every key"
    causal_query_coupled = True  # a rank-m factor of a full block mixes its queries
    # Analysis only: P is normalised in place chunk by chunk and its top eigenvectors taken, so
    # there is no backward pass (an oracle needs none).
    supports_grad = False
    cost_help = (
        "O(n³) per slice: the float64 Gram matrix of D⁻¹A (2·n_q·n_k·min(n_q, n_k)) and its "
        "eigendecomposition (about 9·min(n_q, n_k)³); memory 8·n_q·n_k bytes per slice."
    )

    @classmethod
    def params_for_budget(cls, budget):
        return {"rank": budget, "causal_leaf": budget}

    def keys_per_query(self, n_q, n_k, mask=FULL):
        # a query's row of the rank-m factor: m numbers (rank ≤ min(n_q, n_k)); an oracle
        return float(min(self.config["rank"], n_q, n_k))

    @classmethod
    def exact_limit(cls, n_q, n_k):
        # rank(D⁻¹A) ≤ min(n_q, n_k): nothing is truncated (causal: nor in any smaller block).
        return {"rank": min(n_q, n_k)}

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        # One slice at a time: P in float64, its Gram matrix and eigenvectors (min(n_q, n_k)²
        # each), and the float64 output of every slice.
        small = min(n_q, n_k)
        return float(8 * (2 * n_q * n_k + 3 * small * small) + 8 * b * h * n_q * (d_v + 1))

    def input_reasons(self, n_q, n_k, d, d_v, mask):
        return _too_large(
            "rankk",
            n_q,
            n_k,
            self.config["max_n"],
            "it forms D⁻¹A in float64 and takes an O(n³) eigendecomposition per slice",
        )

    def forward_full(self, q, k, v, scale, generator):
        return self.partial(q, k, v, scale, generator, None).out.to(v.dtype)

    def partial(self, q, k, v, scale, generator, query_offset):
        b, h, n_q, _ = q.shape
        out = torch.empty(b, h, n_q, v.shape[-1], dtype=torch.float64, device=q.device)
        lse = torch.empty(b, h, n_q, dtype=torch.float64, device=q.device)
        for i in range(b):  # one slice at a time: P alone takes 8·n_q·n_k bytes
            for j in range(h):
                sl = (slice(i, i + 1), slice(j, j + 1))
                out[sl] = rank_m_attention(q[sl], k[sl], v[sl], scale, self.config["rank"])
                logits = (q[sl].to(torch.float64) * scale) @ k[sl].to(torch.float64).mT
                lse[sl] = torch.logsumexp(logits, dim=-1)  # the oracle knows the exact row sums
        return Partial(lse.to(q.dtype), out.to(q.dtype))

    def flops(self, b, h, n_q, n_k, d, d_v):
        small = min(n_q, n_k)
        return float(b * h * (2 * n_q * n_k * (d + d_v) + 2 * n_q * n_k * small + 9 * small**3))


def rank_m_attention(q, k, v, scale: float, m: int) -> torch.Tensor:
    """P_m V for one slice (1, 1, n, ·) in float64, P_m the best rank-m approximation of D⁻¹A."""
    p = torch.cat([chunk for _, _, chunk in iter_softmax_chunks(q, k, scale)], dim=-2)
    v64 = v.to(torch.float64)
    n_q, n_k = p.shape[-2:]
    if n_q <= n_k:
        basis = torch.linalg.eigh(p @ p.transpose(-1, -2)).eigenvectors[
            ..., -m:
        ]  # top-m, ascending
        return basis @ (basis.transpose(-1, -2) @ (p @ v64))
    basis = torch.linalg.eigh(p.transpose(-1, -2) @ p).eigenvectors[..., -m:]
    return (p @ basis) @ (basis.transpose(-1, -2) @ v64)
