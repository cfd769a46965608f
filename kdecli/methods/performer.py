"""Performer (FAVOR+): softmax attention through positive random features, in linear time.

Choromanski, Likhosherstov, Dohan, Song, Gane, Sarlos, Hawkins, Davis, Mohiuddin, Kaiser, Belanger,
Colwell, Weller, "Rethinking Attention with Performers", ICLR 2021.  With the features φ of
``kdecli.methods.features`` (E[φ(q)·φ(k)] = e^{s·q·k}) and ṽ_j = (v_j, 1):

    N_i = φ(q_i) · Σ_j φ(k_j) ṽ_jᵀ            (the m × (d_v+1) matrix φ(K)ᵀṼ is built once)
    Õ_i = N_i[:d_v] / N_i[d_v]

The features are shifted inside the exp (per query over features, per feature over keys; see
``features``) so that logits in the hundreds, of either sign, give finite outputs.

Causal(offset): query i sits at position offset + i and the sums run over j ≤ offset + i, as a scan
over chunks of C queries.  The keys [0, offset), seen by every query, start the scan's state; the
prefix before the chunk is a running m × (d_v+1) state (rescaled whenever a feature's key maximum grows, like an online
softmax); inside the chunk the masked C × C products φ(q_i)·φ(k_j) are formed under shifts that
depend only on the query and the keys before it (``in_chunk``), so a later key never changes an
earlier output, not even by rounding; the two parts are merged by their log-sum-exps.  A row sum that
underflows is recomputed in log space, so the output stays finite with logits in the hundreds.
Error falls like 1/√m; there is no exact limit.

Decode (``prepares_cache``): the directions ω, the per-feature key maximum β and the sums
φ(K)ᵀṼ (with Σ_j φ(k_j) as their last column) over the keys every step query sees are computed
once per cache; a step of one query then costs O(m·d) for its features and O(m·d_v) for the
product, whatever n_k.  Under ``Causal(n_k − M)`` the prepared sums are the scan's starting state
(the keys before the first step query) and the step scans its own M keys.

No key set: φ(q)·φ(k) > 0 for every pair, so every allowed key is weighed.  ``log_row_sums`` is
log N_i[d_v] with the shifts added back, log Σ_j φ(q_i)·φ(k_j) (the scan's merged row sums under
a causal mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from kdecli.masks import FULL
from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.common import merge_lse, with_ones_column, working_dtype
from kdecli.methods.decode import DecodeCache
from kdecli.methods.features import (
    favor_features,
    log_features,
    random_directions,
    scaled_keys,
    scaled_queries,
    split_scale,
)
from kdecli.methods.keyset_calls import Call
from kdecli.methods.registry import register

CAUSAL_CHUNK = 64  # positions per scan step: the in-chunk part costs about C·(m + d_v) per query


@register
class Performer(AttentionMethod):
    name = "performer"
    summary = "FAVOR+ positive random features (orthogonal by default), linear in n."
    paper = "Choromanski et al., Rethinking Attention with Performers, ICLR 2021"
    budget_help = "m random features: features = m."
    params = (
        Param("features", int, 256, "number of random features (m)", 1, 2**16),
        Param("orthogonal", bool, True, "orthogonal directions (FAVOR+); false: i.i.d. Gaussian"),
    )
    randomized = True
    supports_causal = True
    key_set_note = (
        "its random features weigh every key the mask allows (φ(q)·φ(k) > 0 for every pair): "
        "no key is left out; its row sums are reported"
    )
    prepares_cache = True
    estimates = "softmax"
    cost_help = (
        "2·(n_q+n_k)·d·m features + (n_q+n_k)·m exponentials + 2·(n_q+n_k)·m·(d_v+1) for φ(K)ᵀṼ "
        "and φ(Q)·(φ(K)ᵀṼ); causal adds 2·C·(m + d_v + 1) per query for the in-chunk part (C = 64)."
    )

    @classmethod
    def params_for_budget(cls, budget):
        return {"features": budget}

    def keys_per_query(self, n_q, n_k, mask=FULL):
        # m random features whatever n_k (not capped: features are not keys); causal adds the
        # in-chunk products with the (C + 1)/2 earlier keys of a query's chunk on average
        in_chunk_keys = (CAUSAL_CHUNK + 1) / 2 if mask.is_causal else 0
        return float(self.config["features"] + in_chunk_keys)

    @classmethod
    def exact_limit(cls, n_q, n_k):
        return None  # φ(q)·φ(k) equals e^{s q·k} only in expectation, for any finite m

    def forward_full(self, q, k, v, scale, generator):
        dtype, work = q.dtype, working_dtype(q.dtype)
        q, k, v = q.to(work), k.to(work), v.to(work)
        qf, kf, _ = favor_features(q, k, scale, self.directions(q, generator))
        kv = torch.einsum("bhjm,bhje->bhme", kf, with_ones_column(v))
        num = torch.einsum("bhim,bhme->bhie", qf, kv)
        return (num[..., :-1] / num[..., -1:]).to(dtype)

    def forward_causal(self, q, k, v, scale, generator, mask):
        dtype, work = q.dtype, working_dtype(q.dtype)
        q, k, v = q.to(work), k.to(work), v.to(work)
        omega = self.directions(q, generator)
        return causal_favor(q, k, v, scale, omega, mask.offset).out.to(dtype)

    def log_row_sums(self, q, k, v, scale, generator, mask=FULL):
        """log D̃_i = log φ(q_i)·Σ_j φ(k_j) over the keys the mask allows, the denominator of
        the estimate (its stabilising shifts added back): the forward's own sums."""
        call = Call.of(self, q, k, v, mask)
        work = working_dtype(q.dtype)
        q, k, v = q.to(work), call.k.to(work), call.v.to(work)
        omega = self.directions(q, generator)
        if call.mask.is_causal:
            return causal_favor(q, k, v, scale, omega, call.mask.offset).lse
        qf, kf, log_shift = favor_features(q, k, scale, omega)
        return log_shift + torch.log(qf @ kf.sum(-2).unsqueeze(-1)).squeeze(-1)

    def prepare_decode(self, cache):
        k, v = cache.k, cache.v
        work = working_dtype(k.dtype)
        k, v = k.to(work), v.to(work)
        omega = self.directions(k, cache.generator)  # drawn first, as the forward draws them
        k1 = scaled_keys(k, cache.scale)
        mask = cache.step_mask
        if mask.is_causal:  # the scan's starting state: the keys before the first step query
            beta, sums = favor_prefix(k1, v, omega, mask.offset)
        else:  # every key, as ``stabilised_features`` sums them
            g = log_features(k1, omega)
            beta = g.amax(dim=-2, keepdim=True)
            sums = torch.einsum("bhjm,bhje->bhme", torch.exp(g - beta), with_ones_column(v))
        return FavorCache.prepared(cache, omega=omega, beta=beta, sums=sums)

    def forward_decode(self, q, cache):
        dtype, work = q.dtype, working_dtype(q.dtype)
        f = log_features(scaled_queries(q.to(work), cache.scale), cache.omega)
        mask = cache.step_mask
        if mask.is_causal:  # scan the step's own keys from the prepared state
            offset = mask.offset
            k1 = scaled_keys(cache.k[..., offset:, :].to(work), cache.scale)
            v = cache.v[..., offset:, :].to(work)
            g = log_features(k1, cache.omega)
            out = favor_scan(f, g, v, cache.beta, cache.sums, offset > 0).out
            return out.to(dtype)
        shifted = f + cache.beta
        qf = torch.exp(shifted - shifted.amax(dim=-1, keepdim=True))
        num = torch.einsum("bhim,bhme->bhie", qf, cache.sums)
        return (num[..., :-1] / num[..., -1:]).to(dtype)

    def directions(self, q, generator):
        """The m random directions ω of every slice, (b, h, m, d), in q's (working) dtype."""
        b, h, _, d = q.shape
        return random_directions(
            b,
            h,
            d,
            self.config["features"],
            orthogonal=self.config["orthogonal"],
            generator=generator,
            device=q.device,
            dtype=q.dtype,
        )

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        # Log-features and stabilised features of every query and key (m each, with their
        # temporaries), the (m × d_v+1) sums, the numerator.
        m = self.config["features"]
        return float(b * h * itemsize * ((n_q + n_k) * (4 * m + d_v + 1) + m * (d_v + 1)))

    def flops(self, b, h, n_q, n_k, d, d_v):
        m = self.config["features"]
        return float(
            b * h * (2 * (n_q + n_k) * d * m + (n_q + n_k) * m + 2 * (n_q + n_k) * m * (d_v + 1))
        )


@dataclass(frozen=True, eq=False)
class FavorCache(DecodeCache):
    """A cache prepared for Performer's decode steps: the directions ω (b, h, m, d), the
    per-feature key maximum β (b, h, 1, m) and Σ_j exp(g_j − β) ṽ_jᵀ (b, h, m, d_v + 1) over
    the keys every step query sees (all of them for one query)."""

    omega: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    sums: torch.Tensor | None = None


def causal_favor(q, k, v, scale, omega, offset=0):
    """FAVOR+ under ``Causal(offset)`` with n_k = offset + n_q, the chunked scan of the module
    docstring, with its log row sums (``Scanned``).  The keys [0, offset) are the state the scan
    starts from."""
    q1, k1 = split_scale(q, k, scale)
    f = log_features(q1, omega)  # (b, h, n_q, m)
    beta, state = favor_prefix(k1, v, omega, offset)
    g = log_features(k1[..., offset:, :], omega)  # the queries' own keys
    return favor_scan(f, g, v[..., offset:, :], beta, state, offset > 0)


class Scanned(NamedTuple):
    """The scan's output (b, h, n_q, d_v) and its log row sums log D̃_i (b, h, n_q)."""

    lse: torch.Tensor
    out: torch.Tensor


def favor_prefix(k1, v, omega, offset):
    """(β, state) of the keys [0, offset), seen by every query of the scan: the per-feature max
    of g over them (b, h, 1, m) and Σ_j exp(g_j − β) ṽ_jᵀ (b, h, m, d_v + 1); −inf and zeros
    for no key."""
    b, h, _, _ = k1.shape
    m = omega.shape[-2]
    if not offset:
        beta = k1.new_full((b, h, 1, m), float("-inf"))
        return beta, k1.new_zeros(b, h, m, v.shape[-1] + 1)
    g = log_features(k1[..., :offset, :], omega)
    beta = g.amax(-2, keepdim=True)
    return beta, torch.exp(g - beta).transpose(-1, -2) @ with_ones_column(v[..., :offset, :])


def favor_scan(f, g, v, beta, state, started):
    """The scan over the n_q queries' own keys (query i's key is g_i, v_i), from the prefix's
    (β, state); ``started``: the prefix holds at least one key.  Returns the output and the
    row sums the chunks merge by (``Scanned``)."""
    b, h, n_q, m = f.shape
    v_aug = with_ones_column(v)
    out = v.new_empty(b, h, n_q, v.shape[-1])
    row_sums = v.new_empty(b, h, n_q)
    for start in range(0, n_q, CAUSAL_CHUNK):
        stop = min(n_q, start + CAUSAL_CHUNK)
        keys = slice(start, stop)
        fc, gc, vc = f[..., start:stop, :], g[..., keys, :], v_aug[..., keys, :]
        lse, part = in_chunk(fc, gc, vc)
        if started or start > 0:  # the prefix part, with a row sum >= 1 by construction
            shifted = fc + beta
            gamma = shifted.amax(-1, keepdim=True)
            num = torch.exp(shifted - gamma) @ state
            lse_prefix = gamma.squeeze(-1) + torch.log(num[..., -1]) - math.log(m)
            lse, part = merge_lse(lse_prefix, num[..., :-1] / num[..., -1:], lse, part)
        out[..., start:stop, :] = part
        row_sums[..., start:stop] = lse
        new_beta = torch.maximum(beta, gc.amax(-2, keepdim=True))
        state = state * torch.exp(beta - new_beta).transpose(-1, -2)
        state = state + torch.exp(gc - new_beta).transpose(-1, -2) @ vc
        beta = new_beta
    return Scanned(row_sums, out)


def in_chunk(fc, gc, vc):
    """(lse, out) of the masked in-chunk products P_ij = Σ_r exp(f_ir + g_jr), j ≤ i.

    Every shift depends on query i and keys j ≤ i only, so a later key of the chunk cannot change
    an earlier output, not even by rounding: qf_ir = exp(f_ir − a_i) with a_i = max_r f_ir,
    kf_jr = exp(g_jr − b_j) with b_j = max_r g_jr, and the key's factor e^{b_j} enters as
    e^{b_j − c_i} with c_i = max_{j ≤ i} b_j (a running max), so that

        P_ij = e^{a_i + c_i} · (qf_i·kf_j) · e^{b_j − c_i},   every factor ≤ 1.

    A row sum can underflow when the query's features all miss its strongest keys' (logits in the
    hundreds); such rows are recomputed exactly in log space, log P_ij = logsumexp_r(f_ir + g_jr).
    """
    size = fc.shape[-2]
    upper = torch.ones(size, size, dtype=torch.bool, device=fc.device).triu(1)
    a = fc.amax(-1, keepdim=True)  # (b, h, C, 1)
    key_max = gc.amax(-1)  # b_j: (b, h, C)
    c = torch.cummax(key_max, dim=-1).values.unsqueeze(-1)  # c_i: (b, h, C, 1)
    key_factor = torch.exp((key_max.unsqueeze(-2) - c).masked_fill(upper, float("-inf")))
    products = torch.exp(fc - a) @ torch.exp(gc - key_max.unsqueeze(-1)).transpose(-1, -2)
    num = (products * key_factor) @ vc
    lse = (a + c).squeeze(-1) - math.log(fc.shape[-1]) + torch.log(num[..., -1])
    part = num[..., :-1] / num[..., -1:]
    bad = num[..., -1] < torch.finfo(num.dtype).tiny ** 0.5
    if bool(bad.any()):
        bi, hi, ii = bad.nonzero(as_tuple=True)
        logits = torch.logsumexp(fc[bi, hi, ii].unsqueeze(-2) + gc[bi, hi], dim=-1)  # (rows, C)
        logits = logits.masked_fill(upper[ii], float("-inf")) - math.log(fc.shape[-1])
        lse = lse.index_put((bi, hi, ii), torch.logsumexp(logits, dim=-1))
        rows = torch.softmax(logits, dim=-1).unsqueeze(-2) @ vc[bi, hi, :, :-1]
        part = part.index_put((bi, hi, ii), rows.squeeze(-2))
    return lse, part
