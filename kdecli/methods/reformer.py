"""Reformer's multi-round LSH attention, as an estimate of softmax(s·QKᵀ)V.

Kitaev, Kaiser, Levskaya, "Reformer: The Efficient Transformer", ICLR 2020.  For each of h rounds:

    bucket(x) = argmax([xR, −xR])        R: d × nb/2 Gaussian, one per round and batch×head slice
    sort queries and keys by (bucket, position); cut the sorted keys into chunks of c and the sorted
    queries into the same number of chunks (n_c = ⌈n_k/c⌉, ⌈n_q/n_c⌉ queries each, as in ``lsh``);
    query chunk t attends to key chunks t and t − 1 (cyclically, as the original does).

A key can reach query i several times: in several rounds, or twice in one round when n_c = 1.  With
c_ij the number of times it does, each occurrence gets the logit ℓ_ij − log c_ij, so that

    Σ_rounds Σ_meetings e^{ℓ_ij − log c_ij} v_j = Σ_{j ∈ U_i} e^{ℓ_ij} v_j,   U_i = ∪_r (i's keys)

Each round gives a log-sum-exp L_r and a softmax output O_r per query; merging them by log-sum-exp
gives Õ_i = softmax over U_i, each key counted once.  Exact when one chunk holds all keys.

``shared_qk=true`` computes the original model's function instead: keys are the unit-normalised
queries (the `k` input is ignored), a query attends to itself only when nothing else is present
(logit −1e5, as the original), so it estimates a different function from the exact reference.

Causal: the shared decomposition (``kdecli.methods.causal``) with L_i = log Σ_{j ∈ U_i} e^{ℓ_ij}, the
row sum over the keys query i met, so the merged estimate is the softmax over the union of the keys
met in every piece.  Queries of a full block are sorted among themselves, so a later query can move
an earlier one's chunk (never a later key into it).  Not with shared_qk (keys would be the block's
queries, which come later).

Decode (``prepares_cache``): for a step of one query (which sees the whole cache) the rotations
are drawn, the keys hashed and sorted into chunks once per cache (``SortedKeys``); a step hashes
its query and runs the rounds.  Note that with fewer queries than chunks every query chunk holds
one query, so a lone query always meets the first and the last sorted chunks, whatever its hash
(rank pairing, docs/methods.md).  A step of several queries runs through the causal
decomposition, whose pieces hash their own keys: it is not prepared (nor with shared_qk, whose keys
are the queries).

Key sets (``kdecli.methods.keysets``): U_i, the union over rounds of the keys of its chunk's window
(causal: over every piece), with the output exact softmax over it; ``log_row_sums`` is its row sum
log Σ_{j∈U_i} e^{ℓ_ij}.  Not with shared_qk, which estimates another function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdecli.errors import ParameterError
from kdecli.masks import FULL
from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.causal import CAUSAL_BUDGET_HELP, CAUSAL_LEAF, Partial
from kdecli.methods.common import (
    Workspace,
    gather_rows,
    merge_lse,
    needs_grad,
    pad_dim,
    working_dtype,
)
from kdecli.methods.decode import DecodeCache
from kdecli.methods.keyset_calls import decomposed_key_sets, decomposed_log_row_sums
from kdecli.methods.registry import register

HASH_CHUNK_ELEMENTS = 2**24  # projections held at once while hashing
SELF_LOGIT = -1e5  # the original's mask value for a query meeting itself under shared QK
SHARED_QK_ESTIMATES = "shared-QK attention: softmax over j ≠ i of s·q_i·q_j/‖q_j‖ (k ignored)"


@register
class Reformer(AttentionMethod):
    name = "reformer"
    summary = "Multi-round angular LSH: sort by bucket, attend within a chunk and the one before."
    paper = "Kitaev, Kaiser, Levskaya, Reformer: The Efficient Transformer, ICLR 2020"
    budget_help = (
        "m keys per query: chunk_size = m/2 (a query sees 2 chunks), n_hashes = 8."
        + CAUSAL_BUDGET_HELP
    )
    params = (
        Param("chunk_size", int, 64, "keys per sorted chunk (c); a query sees 2c keys", 1, 2**24),
        Param("n_hashes", int, 8, "hash rounds (h)", 1, 64),
        Param(
            "n_buckets",
            int,
            0,
            "buckets per round (even); 0: automatic, the even number nearest n_k / chunk_size "
            "(at least 2), so that a bucket holds about one chunk",
            0,
            2**16,
        ),
        Param(
            "shared_qk",
            bool,
            False,
            "the original model: keys = normalised queries, self masked (a different function)",
        ),
        CAUSAL_LEAF,
    )
    randomized = True
    causal_mode = "decomposition"
    key_set_note = (
        "with shared_qk it estimates another function (the keys are the normalised queries), "
        "so no set of the exact attention is reported"
    )
    causal_query_coupled = True  # a full block's queries are sorted into blocks together
    prepares_cache = True
    estimates = "softmax"
    cost_help = (
        "h·(n_q+n_k)·d·nb hashing + 2·h·n_q·2c·(d + d_v) for the chunks + 2·h²·n_q·2c comparisons "
        "counting repeated keys."
    )

    @classmethod
    def params_for_budget(cls, budget):
        return {"chunk_size": max(1, budget // 2), "n_hashes": 8, "causal_leaf": budget}

    @classmethod
    def params_for_keys(cls, budget):
        # h rounds of 2 chunks of c keys: c = m / (2h), with h = 8 (fewer rounds below m = 16)
        rounds = max(1, min(8, budget // 2))
        return {
            "chunk_size": max(1, budget // (2 * rounds)),
            "n_hashes": rounds,
            "causal_leaf": budget,
        }

    def keys_per_query(self, n_q, n_k, mask=FULL):
        # Each round a query meets its chunk and the one before: 2c products per round, paid even
        # when a key recurs across rounds (the repeats are counted out afterwards, not skipped).
        return float(self.config["n_hashes"] * min(2 * self.config["chunk_size"], n_k))

    @classmethod
    def exact_limit(cls, n_q, n_k):
        # One chunk: every query meets every key, each counted once (causal: in every full block).
        return {"chunk_size": n_k}

    def check_config(self):
        nb = self.config["n_buckets"]
        if nb % 2:
            raise ParameterError(
                "reformer: `n_buckets` must be 0 (automatic) or an even integer in [2, 65536]; "
                f"got {nb}."
            )
        if self.config["shared_qk"]:
            self.estimates = SHARED_QK_ESTIMATES

    def input_reasons(self, n_q, n_k, d, d_v, mask):
        if not self.config["shared_qk"]:
            return []
        if mask.is_causal:
            return [
                "shared_qk=true is not causal here (keys would be a full block's later queries)"
            ]
        if n_q != n_k:
            return [
                f"shared_qk=true needs n_q == n_k (keys are the queries); got n_q={n_q}, n_k={n_k}"
            ]
        return []

    def n_buckets_for(self, n_k: int) -> int:
        nb = self.config["n_buckets"]
        return nb if nb else 2 * max(1, round(n_k / (2 * self.config["chunk_size"])))

    def forward_full(self, q, k, v, scale, generator):
        dtype, work = q.dtype, working_dtype(q.dtype)
        q, k, v = q.to(work), k.to(work), v.to(work)
        return self.partial(q, k, v, scale, generator, None).out.to(dtype)

    def partial(self, q, k, v, scale, generator, query_offset):
        cfg = self.config
        if cfg["shared_qk"]:
            k = q / q.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
        rot = self.rotations(k, generator)
        keys = SortedKeys(hash_buckets(k, rot), cfg["chunk_size"])
        return self.rounds(q, k, v, scale, rot, keys)

    def block_sets(self, q, k, v, scale, generator, query_offset):
        """Each query's keys (``kdecli.methods.keyset_calls``): in every round the window of
        its chunk (its sorted keys and the chunk before), drawn as ``partial`` draws."""
        rot = self.rotations(k, generator)
        chunks = ChunkLayout.build(
            hash_buckets(q, rot), SortedKeys(hash_buckets(k, rot), self.config["chunk_size"])
        )
        used = -(-q.shape[-2] // chunks.c_q)
        index, valid = [], []
        for r in range(self.config["n_hashes"]):
            window, real = key_windows(chunks.k_order[:, :, r], chunks.num_chunks, chunks.c_k, used)
            at = chunks.q_chunk[..., r].long().unsqueeze(-1).expand(-1, -1, -1, window.shape[-1])
            index.append(torch.gather(window, 2, at))
            valid.append(torch.gather(real.expand_as(window), 2, at))
        return torch.cat(index, -1), torch.cat(valid, -1)

    def key_sets(self, q, k, v, scale, generator, mask=FULL):
        # softmax over the union of the keys met, each once: exact over the set
        if self.config["shared_qk"]:
            return None
        return decomposed_key_sets(self, q, k, v, scale, generator, mask, exact_over_set=True)

    def log_row_sums(self, q, k, v, scale, generator, mask=FULL):
        # log Σ_{j∈U_i} e^{ℓ_ij}, and the pieces' merged under a causal mask
        if self.config["shared_qk"]:
            return None
        return decomposed_log_row_sums(self, q, k, v, scale, generator, mask)

    def rotations(self, k, generator):
        """The rotations of every round for these keys (their number sets the buckets)."""
        b, h, n_k, d = k.shape
        nb = self.n_buckets_for(n_k)
        return draw_rotations(b, h, self.config["n_hashes"], d, nb, generator, k.device, k.dtype)

    def rounds(self, q, k, v, scale, rot, keys: SortedKeys) -> Partial:
        """Every round on the sorted keys, merged: the estimate with its log row sums."""
        chunks = ChunkLayout.build(hash_buckets(q, rot), keys)
        # Under autograd the rounds allocate afresh: a reused buffer cannot hold what backward needs.
        workspace = Workspace(enabled=not needs_grad(q, k, v))
        q_scaled, lse, out = q * scale, None, None
        for r in range(self.config["n_hashes"]):
            lse_r, out_r = one_round(q_scaled, k, v, chunks, r, self.config["shared_qk"], workspace)
            lse, out = (lse_r, out_r) if lse is None else merge_lse(lse, out, lse_r, out_r)
        return Partial(lse, out)

    def prepare_decode(self, cache):
        if cache.step_mask.is_causal or self.config["shared_qk"]:  # the module docstring
            return cache
        work = working_dtype(cache.k.dtype)
        k, v = cache.k.to(work), cache.v.to(work)
        rot = self.rotations(k, cache.generator)  # drawn first, as the forward draws them
        keys = SortedKeys(hash_buckets(k, rot), self.config["chunk_size"])
        return HashedCache.prepared(cache, work_k=k, work_v=v, rotations=rot, sorted_keys=keys)

    def forward_decode(self, q, cache):
        if not isinstance(cache, HashedCache):
            return super().forward_decode(q, cache)
        dtype, work = q.dtype, working_dtype(q.dtype)
        k, v = cache.work_k, cache.work_v
        partial = self.rounds(q.to(work), k, v, cache.scale, cache.rotations, cache.sorted_keys)
        return partial.out.to(dtype)

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        # Per query: one round's window logits, weights and counts (2c each), the merged and the
        # round's outputs; per row and round: its bucket (int64) and chunk ids; per key: the
        # gathered windows (twice: look-back); plus one chunk of hashing projections.
        cfg = self.config
        c, rounds = min(cfg["chunk_size"], n_k), cfg["n_hashes"]
        per_query = itemsize * (3 * 2 * c + 3 * d_v + d) + 12 * rounds
        per_key = itemsize * 4 * (d + d_v) + 12 * rounds
        hashing = itemsize * 2 * HASH_CHUNK_ELEMENTS
        return float(b * h * (n_q * per_query + n_k * per_key) + hashing)

    def flops(self, b, h, n_q, n_k, d, d_v):
        cfg = self.config
        c, rounds, nb = min(cfg["chunk_size"], n_k), cfg["n_hashes"], self.n_buckets_for(n_k)
        return float(
            b
            * h
            * (
                rounds * (n_q + n_k) * d * nb
                + 2 * rounds * n_q * 2 * c * (d + d_v)
                + 2 * rounds**2 * n_q * 2 * c
            )
        )


def draw_rotations(b, h, rounds, d, n_buckets, generator, device, dtype) -> torch.Tensor:
    """Random rotations R (b, h, rounds, d, n_buckets/2), drawn in float32 for every dtype."""
    rot = torch.randn(
        b, h, rounds, d, n_buckets // 2, generator=generator, device=device, dtype=torch.float32
    )
    return rot.to(dtype)


def hash_buckets(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """bucket = argmax([xR, −xR]) for every round: (b, h, rounds, n) int64.

    One round at a time, and without building [xR, −xR]: the projections of all rounds at once
    take rounds·n·nb/2 numbers per slice.  Rows go in chunks of at most HASH_CHUNK_ELEMENTS
    projections, since nb/2 grows with n (n_buckets ≈ n_k/c): at n = 2^20 one round's projections
    alone would take 16 GiB.  Ties go to the first half, as argmax over the concat.
    """
    b, h, n, _ = x.shape
    half = rot.shape[-1]
    step = max(1, HASH_CHUNK_ELEMENTS // max(1, b * h * half))
    buckets = torch.empty(b, h, rot.shape[2], n, dtype=torch.int64, device=x.device)
    for r in range(rot.shape[2]):
        for start in range(0, n, step):
            proj = x[:, :, start : start + step] @ rot[:, :, r]  # (b, h, rows, nb/2)
            top, arg_top = proj.max(dim=-1)
            low, arg_low = proj.min(dim=-1)
            buckets[:, :, r, start : start + step] = torch.where(
                top >= -low, arg_top, half + arg_low
            )
    return buckets


@dataclass(frozen=True, eq=False)
class HashedCache(DecodeCache):
    """A cache prepared for Reformer's one-query steps: the keys and values in the working
    dtype, the rotations of every round and the keys hashed and sorted into chunks."""

    work_k: torch.Tensor | None = None
    work_v: torch.Tensor | None = None
    rotations: torch.Tensor | None = None
    sorted_keys: SortedKeys | None = None


class SortedKeys:
    """The keys' half of a ``ChunkLayout``: per round, their (bucket, position) sort and every
    key's chunk; it depends on the keys alone, so a decode cache computes it once.

    ``k_order`` (b, h, rounds, n_k): sorted position -> original index (a stable sort of the
    buckets keeps positions increasing inside a bucket).  ``k_chunk`` (b, h, n_k, rounds):
    original index -> chunk in every round, in ``small``, the least integer type that holds the
    chunk ids (uint8 when it fits: the co-occurrence count then runs on one byte per pair).  Keys
    fill n_c = ⌈n_k/c_k⌉ chunks of c_k = min(c, n_k) (only the last one padded).
    """

    def __init__(self, k_bucket, chunk_size):
        n_k = k_bucket.shape[-1]
        self.c_k = min(chunk_size, n_k)
        self.num_chunks = nc = -(-n_k // self.c_k)
        self.small = torch.uint8 if nc <= 256 else torch.int16 if nc < 2**15 else torch.int32
        self.k_order = torch.sort(k_bucket, dim=-1, stable=True).indices
        k_chunk = torch.argsort(self.k_order, dim=-1) // self.c_k
        self.k_chunk = k_chunk.transpose(-1, -2).to(self.small)


class ChunkLayout:
    """Per round, the (bucket, position) sort of queries and keys and the chunk of every row.

    The keys' part is a ``SortedKeys``; ``q_order`` (b, h, rounds, n_q) and ``q_chunk`` (b, h,
    n_q, rounds) are the queries' (in the keys' chunk-id type, for cheap compares);
    ``q_chunk_prev`` the chunk before the query's, cyclically.  Queries fill as many chunks as the
    keys, of c_q = ⌈n_q/n_c⌉.
    """

    def __init__(self, q_order, q_chunk, c_q, keys: SortedKeys):
        self.q_order, self.k_order = q_order, keys.k_order
        num_chunks = keys.num_chunks
        self.q_chunk = q_chunk.transpose(-1, -2).to(keys.small)
        self.q_chunk_prev = ((q_chunk - 1) % num_chunks).transpose(-1, -2).to(keys.small)
        self.k_chunk = keys.k_chunk
        self.num_chunks, self.c_q, self.c_k = num_chunks, c_q, keys.c_k

    @classmethod
    def build(cls, q_bucket, keys: SortedKeys):
        c_q = -(-q_bucket.shape[-1] // keys.num_chunks)
        q_order = torch.sort(q_bucket, dim=-1, stable=True).indices
        q_chunk = torch.argsort(q_order, dim=-1) // c_q
        return cls(q_order, q_chunk, c_q, keys)


def one_round(q_scaled, k, v, chunks: ChunkLayout, r: int, shared_qk: bool, workspace: Workspace):
    """(lse, out) of round r for every query in original order: (b, h, n_q), (b, h, n_q, d_v)."""
    b, h, n_q, d = q_scaled.shape
    d_v = v.shape[-1]
    nc, c_q, c_k = chunks.num_chunks, chunks.c_q, chunks.c_k
    q_order, k_order = chunks.q_order[:, :, r], chunks.k_order[:, :, r]
    # The chunks that hold a query: all of them, unless there are fewer queries than chunks (a
    # decode step), when the queries fill the first n_q and the rest would be padding alone.
    used = -(-n_q // c_q)

    q_idx = pad_dim(q_order, used * c_q, dim=-1).view(b, h, used, c_q)  # padding reads query 0
    k_win_idx, key_valid = key_windows(k_order, nc, c_k, used)  # (b, h, used, 2c_k)

    def rows(name, x, index, per_slice):
        buffer = workspace.get(name, (b, h, per_slice, x.shape[-1]), x.dtype, x.device)
        return gather_rows(x, index.flatten(2), out=buffer).view(b, h, used, -1, x.shape[-1])

    k_win = rows("k_win", k, k_win_idx, used * 2 * c_k)
    v_win = rows("v_win", v, k_win_idx, used * 2 * c_k)
    q_sorted = rows("q_sorted", q_scaled, q_idx, used * c_q)

    window = (b, h, used, c_q, 2 * c_k)
    logits = workspace.get("logits", window, q_sorted.dtype, q_sorted.device)
    logits = torch.matmul(q_sorted, k_win.transpose(-1, -2), out=logits)
    if shared_qk:
        logits.masked_fill_(q_idx.unsqueeze(-1) == k_win_idx.unsqueeze(-2), SELF_LOGIT)
    logits.masked_fill_(~key_valid.unsqueeze(-2), float("-inf"))

    # e^{ℓ_ij} / c_ij: the count divides the weight instead of shifting the logit by log c_ij,
    # which saves a log and a pass; the shift `top` stays a valid bound since c_ij >= 1.
    top = logits.amax(-1, keepdim=True).detach()  # finite: every window holds a full chunk;
    # a shift that cancels in the ratio, so it needs no gradient
    count = co_occurrences(chunks, r, q_idx, k_win_idx, workspace)
    if workspace.enabled:
        weights = logits.sub_(top).exp_()
        weights /= workspace.get("count_f", window, weights.dtype, weights.device).copy_(count)
        if not bool(key_valid.all()):
            weights.masked_fill_(~key_valid.unsqueeze(-2), 0.0)
    else:
        weights = torch.exp(logits - top) / count.to(logits.dtype)  # a copy: count is scratch
        if not bool(key_valid.all()):
            weights = weights.masked_fill(~key_valid.unsqueeze(-2), 0.0)
    total = weights.sum(-1)
    lse = (top.squeeze(-1) + torch.log(total)).view(b, h, used * c_q)[..., :n_q]
    out = ((weights @ v_win) / total.unsqueeze(-1)).view(b, h, used * c_q, d_v)[:, :, :n_q]
    # Back to the original query order.
    lse_orig = torch.empty_like(lse).scatter_(-1, q_order, lse)
    out_orig = torch.empty_like(out).scatter_(-2, q_order.unsqueeze(-1).expand_as(out), out)
    return lse_orig, out_orig


def key_windows(k_order, num_chunks: int, c_k: int, used: int):
    """The keys the first ``used`` query chunks see: (b, h, used, 2c_k) original indices, for
    chunk t its sorted keys then those of chunk t − 1 (cyclically), and (1, 1, used, 2c_k) which
    are real keys (the last chunk may be padded: its padding reads key 0, masked out).  Only those
    windows are formed, so a step of one query does not pay for every chunk."""
    n_k, device = k_order.shape[-1], k_order.device
    t = torch.arange(used, device=device)
    chunk = torch.stack([t, (t - 1) % num_chunks], dim=-1)  # (used, 2)
    position = (chunk.unsqueeze(-1) * c_k + torch.arange(c_k, device=device)).view(used, 2 * c_k)
    valid = position < n_k
    index = k_order[..., position.clamp(max=n_k - 1)].masked_fill(~valid, 0)
    return index, valid.view(1, 1, used, 2 * c_k)


def co_occurrences(
    chunks: ChunkLayout, r: int, q_idx, k_win_idx, workspace: Workspace
) -> torch.Tensor:
    """c_ij for every (query, window key) pair of round r: (b, h, nc, c_q, 2c_k) integers.

    In round r' query i meets key j once for each of chunks t_{r'}(i), t_{r'}(i) − 1 (mod n_c)
    equal to j's chunk; with n_c = 1 both are the same chunk and j is met twice.  Round r itself
    contributes exactly that for every pair of its windows.  O(h) compares per pair, O(h²) in all.
    The dtype is the smallest integer type that holds the counts.
    """
    nc, rounds = chunks.num_chunks, chunks.q_chunk.shape[-1]
    shape = (*q_idx.shape, k_win_idx.shape[-1])
    if nc <= 2:  # every round's window is every chunk: n_c = 1 meets each key twice, n_c = 2 once
        return torch.full(shape, rounds * (3 - nc), dtype=torch.int32, device=q_idx.device)

    def per_round(
        table, index
    ):  # (rounds, …, rows): each round's ids contiguous, for fast broadcasts
        return (
            gather_rows(table, index.flatten(2)).view(*index.shape, -1).movedim(-1, 0).contiguous()
        )

    tq, tq_prev, tk = (
        per_round(chunks.q_chunk, q_idx),
        per_round(chunks.q_chunk_prev, q_idx),
        per_round(chunks.k_chunk, k_win_idx),
    )
    # Count the misses instead of the meetings: [a ≠ b] = min(a − b, 1) in wrapping uint8 (or
    # min(a XOR b, 1)) is three cheap integer passes, while a comparison writing a bool tensor is
    # about 5× slower on the CPU.  Counts stay below 2·rounds, so uint8 holds them when ids do.
    dtype = tq.dtype if 2 * rounds < 256 else torch.int16
    misses = workspace.tensor("misses", shape, dtype, q_idx.device).zero_()
    differs = workspace.tensor("differs", shape, tq.dtype, q_idx.device)
    differ = torch.sub if tq.dtype == torch.uint8 else torch.bitwise_xor
    for other in range(rounds):
        if other != r:
            key_chunk = tk[other].unsqueeze(-2)
            for query_chunk in (tq[other], tq_prev[other]):
                differ(query_chunk.unsqueeze(-1), key_chunk, out=differs)
                misses += differs.clamp_(max=1)
    return misses.neg_().add_(1 + 2 * (rounds - 1))
