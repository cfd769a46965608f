"""MagicPIG (Chen et al., ICLR 2025): LSH sampling with importance-corrected logits.

SimHash with L tables of K bits: table t draws K random hyperplanes w_{t,1..K}, and a vector x gets
the code c_t(x) = (sign(w_{t,b}·x))_b.  Key j is a *candidate* of query i when their codes agree in
at least two tables.  With u = 1 − θ_ij/π (θ_ij the angle between q_i and k_j) one table agrees
with probability u^K, so the candidate probability is

    p_ij = 1 − (1 − u^K)^L − L·u^K·(1 − u^K)^(L−1)

The first ``sinks`` positions and a ``window`` of the most recent ones (as in ``streaming``) are
kept exact; the candidates C_i outside them enter the same softmax with the logit ℓ_ij − log p_ij
(an importance-sampling estimate of their share of the row sum, merged with the exact part through
the row sums):

    Õ_i = (Σ_{j∈E_i} e^{ℓ_ij} v_j + Σ_{j∈C_i} e^{ℓ_ij}/p_ij · v_j)
          / (Σ_{j∈E_i} e^{ℓ_ij} + Σ_{j∈C_i} e^{ℓ_ij}/p_ij)

Budget m: half exact (sinks and window), half the expected candidates; with ``tables`` = 0 the L
is the one whose expected candidates, for keys at right angles to a query at the last position
(u = 1/2), come closest to that half (``tables_for``; the paper's L is 150).  Real keys are not at
right angles to their queries, so the candidates are random and data-dependent:
``realised_keys_per_query`` counts |E_i| + |C_i| on the call's own draw (the keys column of
``compare``), never the expectation.  The hyperplanes are drawn per slice from the generator.
Here the collision test compares every query's codes with every allowed key's (a table lookup in
the deployed system), so the call costs about what exact attention does: the figures are its
error, not its speed.  Exact when the window covers the prefix.

Key sets (``kdecli.methods.keysets``): S_i = E_i ∪ C_i, over which it estimates (the candidates
importance-weighted, ``exact_over_set`` False); ``log_row_sums`` is the log of the denominator
above, log(Σ_{E_i} e^{ℓ_ij} + Σ_{C_i} e^{ℓ_ij}/p_ij).  Both come from the forward's own chunks.
"""

from __future__ import annotations

import math

import torch

from kdecli.errors import ParameterError
from kdecli.masks import FULL
from kdecli.measure.reference import chunk_rows
from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.common import working_dtype
from kdecli.methods.keyset_calls import Call, in_forward_chunks
from kdecli.methods.keysets import KeySets
from kdecli.methods.registry import register
from kdecli.methods.selection import query_positions, sinks_and_window

SINKS, WINDOW = 4, 64  # the paper's exact part: attention sinks and a local window
BITS, TABLES = 10, 150  # the paper's (K, L) for its long-context models
MAX_TABLES = 600  # 4× the paper's: the collision test here costs n_q·n_k·L
# n_q·n_k of a 16k prefill, or one decode query over 256M keys: past it the collision test of
# this simulation runs for many minutes on a CPU (a table lookup in the deployed system)
MAX_PAIRS = 2**28


@register
class MagicPIG(AttentionMethod):
    name = "magicpig"
    summary = "MagicPIG: SimHash candidates (≥ 2 of L tables), logits corrected by −log p."
    paper = "Chen, Sadhukhan, Ye, Zhou, Zhang, Nolte, Tian, Douze, Bottou, Jia, Chen, ICLR 2025"
    budget_help = (
        f"m = keys per query, half exact (sinks = {SINKS}, window = m/2 − {SINKS}) and half the "
        "expected LSH candidates (`candidates`), which set L when `tables` = 0: the expectation "
        "for keys at right angles to the query; the keys column holds the count each draw "
        "realised (the same under `--budget-mode keys`)."
    )
    params = (
        Param("bits", int, BITS, "SimHash bits per table (K)", 1, 30),
        Param("tables", int, 0, f"hash tables (L; the paper's is {TABLES}); 0: as many as make "
              "the expected candidates of keys at right angles to the query `candidates`",
              0, MAX_TABLES),
        Param("candidates", int, 128, "expected LSH candidates per query, for tables = 0",
              0, 2**24),
        Param("sinks", int, SINKS, "initial positions kept exact", 0, 2**24),
        Param("window", int, WINDOW, "most recent positions kept exact, the query's own included",
              1, 2**24),
        Param("max_pairs", int, MAX_PAIRS, "refuse inputs with n_q·n_k above this (the collision "
              "test here compares every query with every key, in every table)", 1, 2**40),
    )  # fmt: skip
    randomized = True
    supports_causal = True
    key_set_note = ""  # it returns its key sets
    supports_grad = False  # the candidates are a discrete draw and p_ij is not differentiated
    cost_help = (
        "hashing 2·(n_q + n_k)·d·K·L, the collision test n_q·n_k·L, and the products of the kept "
        "keys 2·n_q·|S_i|·(d + d_v) (the test is a table lookup in the deployed system)."
    )

    @classmethod
    def params_for_budget(cls, budget):
        half = max(1, budget // 2)
        exact = {"window": half - SINKS} if half > SINKS else {"sinks": half - 1, "window": 1}
        return {**exact, "candidates": budget - half}

    def check_config(self):
        if self.config["tables"] == 1:
            raise ParameterError(
                "magicpig: `tables` must be 0 (automatic) or at least 2: a candidate agrees with "
                "the query in two tables; got 1."
            )

    def exact_kept(self, positions: torch.Tensor) -> torch.Tensor:
        """|E_p|: the sinks and window a query at position p keeps exact."""
        return sinks_and_window(positions, self.config["sinks"], self.config["window"])

    def tables_for(self, n_k: int) -> int:
        """L: the ``tables`` parameter, or (0) the L whose expected candidates, for a query at
        the last of n_k positions among the keys outside its exact part and at u = 1/2 (keys at
        right angles to it), come closest to ``candidates``.  It depends on the keys only, so
        a decode step gets the draw and the numbers of the same rows of a prefill."""
        if self.config["tables"]:
            return self.config["tables"]
        last = torch.tensor([n_k - 1])
        others = float(n_k - self.exact_kept(last))
        tables = torch.arange(2, MAX_TABLES + 1, dtype=torch.float64)
        chance = collision_probability(torch.tensor(0.5, dtype=torch.float64), self.config["bits"],
                                       tables)  # fmt: skip
        return int(tables[(chance * others - self.config["candidates"]).abs().argmin()])

    def keys_per_query(self, n_q, n_k, mask=FULL):
        # the model: the exact part, and the expected candidates at u = 1/2; compare records the
        # count each draw realised (realised_keys_per_query)
        positions = query_positions(n_q, n_k, mask, torch.device("cpu"))
        exact = self.exact_kept(positions).double()
        chance = float(collision_probability(torch.tensor(0.5, dtype=torch.float64),
                                             self.config["bits"], self.tables_for(n_k)))  # fmt: skip
        return float((exact + chance * (positions + 1 - exact)).mean())

    def input_reasons(self, n_q, n_k, d, d_v, mask):
        limit = self.config["max_pairs"]
        if n_q * n_k <= limit:
            return []
        return [
            f"magicpig's collision test compares every query with every key in each of its "
            f"{self.tables_for(n_k)} tables: n_q·n_k = {n_q * n_k:,} is above max_pairs = "
            f"{limit:,}. Raise it with `--param max_pairs={n_q * n_k}` if you can afford it."
        ]

    @classmethod
    def exact_limit(cls, n_q, n_k):
        return {"window": n_k}  # every allowed key is in the exact part

    def forward_full(self, q, k, v, scale, generator):
        return self.forward_causal(q, k, v, scale, generator, FULL)

    def forward_causal(self, q, k, v, scale, generator, mask):
        return self.estimate(q, k, v, scale, generator, mask)[0].to(v.dtype)

    def realised_keys_per_query(self, q, k, v, scale, generator, mask=FULL) -> float:
        """|E_i| + |C_i| averaged over queries and slices, on the draw ``generator`` gives (the
        call's own, with the same seed)."""
        keys, mask = self.runs_as(q.shape[-2], k.shape[-2], mask)
        k, v = k[..., :keys, :], v[..., :keys, :]
        return self.estimate(q, k, v, scale, generator, mask)[1]

    def estimate(self, q, k, v, scale, generator, mask) -> tuple[torch.Tensor, float]:
        """(Õ, mean keys read per query) under ``mask`` (n_k = offset + n_q when causal)."""
        work = working_dtype(q.dtype)
        v = v.to(work)
        b, h, n_q, _ = q.shape
        step, chunk = self.hashed(q, k, scale, generator, mask)
        out = torch.empty(b, h, n_q, v.shape[-1], dtype=work, device=q.device)
        read = 0.0
        for start in range(0, n_q, step):
            stop = min(n_q, start + step)
            kept, corrected = chunk(start, stop)
            weights = torch.softmax(corrected.masked_fill(~kept, float("-inf")), dim=-1)
            out[..., start:stop, :] = weights @ v
            read += float(kept.sum())
        return out, read / (b * h * n_q)

    def hashed(self, q, k, scale, generator, mask):
        """(step, ``chunk(start, stop) -> (kept, corrected)``): the hyperplanes drawn and the keys
        hashed once, then per chunk of ``step`` queries the keys read, E_i ∪ C_i (b, h, c, n_k),
        and the logits with the candidates' −log p_ij (the forward's and the sets' one code)."""
        work = working_dtype(q.dtype)
        q, k = q.to(work), k.to(work)
        b, h, n_q, d = q.shape
        n_k = k.shape[-2]
        bits, tables = self.config["bits"], self.tables_for(n_k)
        planes = torch.randn(b, h, d, bits * tables, generator=generator, dtype=work).to(q.device)
        key_codes = simhash_codes(k, planes, bits, tables)
        key_norms = k.norm(dim=-1).clamp_min(torch.finfo(work).tiny)
        positions = query_positions(n_q, n_k, mask, q.device)
        keys = torch.arange(n_k, device=q.device)

        def chunk(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            p = positions[start:stop].unsqueeze(-1)
            qc = q[..., start:stop, :]
            allowed = keys <= p  # (c, n_k)
            exact = allowed & ((keys < self.config["sinks"]) | (keys > p - self.config["window"]))
            hits = collisions(simhash_codes(qc, planes, bits, tables), key_codes)
            candidate = allowed & ~exact & (hits >= 2)
            logits = scale * qc @ k.transpose(-1, -2)
            cosine = (qc @ k.transpose(-1, -2)) / (
                qc.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(work).tiny)
                * key_norms.unsqueeze(-2)
            )
            angle = torch.arccos(cosine.double().clamp(-1, 1))
            log_chance = collision_probability(1 - angle / math.pi, bits, tables).log()
            corrected = torch.where(candidate, logits - log_chance.to(work), logits)
            return exact | candidate, corrected

        return chunk_rows(3 * b * h, n_k), chunk  # about eight n_k-wide buffers per query

    def key_sets(self, q, k, v, scale, generator, mask=FULL):
        # E_i exact, C_i importance-weighted: an estimate over the set, not softmax over it
        call = Call.of(self, q, k, v, mask)
        step, chunk = self.hashed(q, call.k, scale, generator, call.mask)
        rows = in_forward_chunks(q.shape[-2], step, lambda start, stop: chunk(start, stop)[0])
        return call.widened(KeySets(q.shape[-2], call.k.shape[-2], rows, exact_over_set=False))

    def log_row_sums(self, q, k, v, scale, generator, mask=FULL):
        # log(Σ_{E_i} e^ℓ + Σ_{C_i} e^ℓ/p): the denominator of the module docstring
        call = Call.of(self, q, k, v, mask)
        step, chunk = self.hashed(q, call.k, scale, generator, call.mask)
        pieces = []
        for start in range(0, q.shape[-2], step):
            kept, corrected = chunk(start, min(q.shape[-2], start + step))
            pieces.append(torch.logsumexp(corrected.masked_fill(~kept, float("-inf")), dim=-1))
        return torch.cat(pieces, dim=-1)

    def flops(self, b, h, n_q, n_k, d, d_v):
        bits, tables = self.config["bits"], self.tables_for(n_k)
        hashing = 2 * (n_q + n_k) * d * bits * tables
        kept = self.keys_per_query(n_q, n_k)
        return float(b * h * (hashing + n_q * n_k * tables + 2 * n_q * kept * (d + d_v)))

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        # the codes (int64) and hyperplanes, one chunk of n_k-wide buffers (chunk_rows' budget,
        # about eight buffers where it counts three), and the output
        from kdecli.measure.reference import DEFAULT_MEMORY_BYTES

        tables = self.tables_for(n_k)
        codes = b * h * (8 * (n_q + n_k) * tables + itemsize * d * self.config["bits"] * tables)
        return float(codes + 3 * DEFAULT_MEMORY_BYTES + b * h * itemsize * n_q * d_v)


def simhash_codes(x: torch.Tensor, planes: torch.Tensor, bits: int, tables: int) -> torch.Tensor:
    """(…, n, L) integer codes: the signs of x against each table's K hyperplanes, as K-bit
    integers (``planes`` (b, h, d, K·L), table t in columns t·K .. t·K + K − 1)."""
    signs = (x @ planes > 0).long().unflatten(-1, (tables, bits))
    weights = 2 ** torch.arange(bits, device=x.device)  # K ≤ 30: the code fits in an int64
    return (signs * weights).sum(-1)


def collisions(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    """(…, n_q, n_k) the number of tables in which each query's code equals each key's (one
    table at a time, so memory stays n_q·n_k)."""
    count = torch.zeros(
        *query_codes.shape[:-1], key_codes.shape[-2], dtype=torch.int16, device=key_codes.device
    )
    for t in range(query_codes.shape[-1]):
        count += query_codes[..., t].unsqueeze(-1) == key_codes[..., t].unsqueeze(-2)
    return count


def collision_probability(u: torch.Tensor, bits: int, tables) -> torch.Tensor:
    """p = 1 − (1 − u^K)^L − L·u^K·(1 − u^K)^(L−1): at least two of L tables agree, each with
    probability u^K (take u in float64: for small u^K the terms cancel); clamped away from 0
    (a candidate has p > 0 in exact arithmetic)."""
    one = u.pow(bits)
    miss = (1 - one).clamp_min(0)
    p = 1 - miss.pow(tables) - tables * one * miss.pow(tables - 1)
    return p.clamp_min(torch.finfo(u.dtype).tiny)
