"""xattention (Xu et al., ICML 2025, XAttention): tiles kept by the mass of their antidiagonals.

Each S × S sub-block of the logit matrix (S = ``stride``, default 8) is summarised by its
antidiagonal, the S logits ℓ_{aS+S−1−u, cS+u}, u = 0 … S−1, which cross every row and every
column of the sub-block once, so a vertical or a slash line through it is never missed.  For all
sub-blocks at once this is one product of reshaped matrices (n/S × S·d each): the rows of Q in
groups of S, reversed and concatenated, Q̃_a = [q_{aS+S−1}, …, q_{aS}], against the keys in
groups of S, K̃_c = [k_{cS}, …, k_{cS+S−1}]:

    r_ac = (scale / S) · Q̃_a · K̃_c = mean_u ℓ_{aS+S−1−u, cS+u},

an S-th of the logits' products.  As in the authors' code the mean antidiagonal logits are
softmax-normalised per group of queries, P̂_ac = softmax_c(r_ac), and summed into tiles,
A_ts = Σ_{a∈t, c∈s} P̂_ac; each query tile's shares A_ts / Σ_s A_ts sum to 1.  Under a causal
mask a query tile scores only the key groups before its diagonal tile, which the kernel always
computes: reading that tile's keys would let a key after one of the tile's queries move the
choice (XAttention's own mask keeps the diagonal sub-blocks in the softmax; here the shares are
those of the attention before the tile).  Query tile t keeps its diagonal tiles and then tiles in
descending share until the shares kept reach τ (``tau``, default 0.9), at most ⌈keys/B⌉ tiles in
all, and attends exactly to them (``kdecli.methods.tiles``).

Threshold-driven: ``tau`` sets the kept tiles; the budget only caps them (``keys``), and the keys
column reports what the call read (compare at equal reads with ``--budget-mode keys``).  The
choice of a query tile reads its own queries and the keys before it.  Exact when τ = 1 and the
cap keeps every tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdecli.errors import ParameterError
from kdecli.masks import FULL
from kdecli.methods.base import Param
from kdecli.methods.registry import register
from kdecli.methods.tiles import BLOCK, BLOCK_PARAM, KeyBlocks, TileLayout
from kdecli.methods.vertical_slash import PerSlice

STRIDE = 8
# Reduced logits (query groups × key groups) held at once: the query chunk of the scoring pass.
SCORE_ELEMENTS = 2**23

CAP_PARAM = Param(
    "keys", int, 2**24, "at most this many keys per query (⌈keys/B⌉ tiles per query tile, the "
    "diagonal included): the budget caps a threshold rule", 1, 2**24,
)  # fmt: skip


def antidiagonal_shares(
    q: torch.Tensor, k: torch.Tensor, scale: float, stride: int, layout: TileLayout
) -> torch.Tensor:
    """(b, h, T_q, T_k) the share of each key tile in each query tile's estimated attention
    (module docstring; ``layout.block`` a multiple of ``stride``); a query tile with no key
    group to score has no shares (all 0).  The query tiles run in chunks of at most
    ``SCORE_ELEMENTS`` reduced logits; under a causal mask a chunk's product stops at the last
    key group it may score."""
    b, h, n_q, d = q.shape
    n_k, block = k.shape[-2], layout.block
    per_tile = block // stride
    groups_q, groups_k = layout.query_tiles * per_tile, layout.key_tiles * per_tile
    # Q̃ (b, h, G_q, S·d): the queries by tile (empty rows zero: they add nothing to a sum), in
    # groups of S reversed; K̃ (b, h, G_k, S·d): the keys, padded with zero rows, in groups of S
    rows = layout.tile_rows(q).flatten(-3, -2)
    q_groups = rows.unflatten(-2, (groups_q, stride)).flip(-2).flatten(-2)  # a copy: flip
    q_groups.mul_(scale / stride)  # r_ac = (scale/S)·Q̃_a·K̃_c
    keys = k if groups_k * stride == n_k else F.pad(k, (0, 0, 0, groups_k * stride - n_k))
    k_groups = keys.reshape(b, h, groups_k, stride * d)
    # the key groups each query tile scores: the real ones; causal, those wholly before the
    # start of its diagonal tile (which the kernel always computes)
    scored = torch.full((layout.query_tiles,), -(-n_k // stride), dtype=torch.long)
    if layout.causal:
        scored = torch.minimum(scored, layout.tile_starts() // stride)
    scored = scored.to(q.device).repeat_interleave(per_tile)  # per query group
    # a group of empty rows only has no share
    group_start = torch.arange(groups_q, device=q.device) * stride
    real_q = (group_start + stride > layout.lead) & (group_start < layout.lead + n_q)
    # a group of empty rows, or of rows scoring nothing, has no share
    weight = (real_q & (scored > 0)).to(q.dtype)
    shares = q.new_zeros(b, h, layout.query_tiles, layout.key_tiles)
    chunk = max(1, SCORE_ELEMENTS // max(1, b * h * groups_k * per_tile))
    if layout.causal:  # a staircase of chunks computes about half the square, not all of it
        chunk = min(chunk, max(1, -(-layout.query_tiles // 16)))
    chunk = min(chunk, layout.query_tiles)
    # one buffer for every chunk's reduced logits: a fresh one per chunk costs its page faults
    buffer = q.new_empty(b * h * chunk * per_tile * groups_k)
    for t0 in range(0, layout.query_tiles, chunk):
        t1 = min(layout.query_tiles, t0 + chunk)
        a0, a1 = t0 * per_tile, t1 * per_tile
        reach = -(-int(scored[a0:a1].max()) // per_tile)  # key tiles the chunk scores
        if reach == 0:
            continue
        width = reach * per_tile
        reduced = buffer[: b * h * (a1 - a0) * width].view(b, h, a1 - a0, width)
        torch.matmul(q_groups[..., a0:a1, :], k_groups[..., :width, :].transpose(-1, -2),
                     out=reduced)  # fmt: skip
        # the rows of a chunk differ in what they score only in its last columns
        low = int(scored[a0:a1].min())
        tail = torch.arange(low, width, device=q.device)
        reduced[..., low:].masked_fill_(tail >= scored[a0:a1].unsqueeze(-1), float("-inf"))
        if low == 0:  # a row scoring nothing: any finite row (its weight is 0), never NaN
            reduced.masked_fill_((scored[a0:a1] == 0).unsqueeze(-1), 0.0)
        # P̂ in place (the fused softmax: one kernel, no second buffer)
        torch.ops.aten._softmax.out(reduced, -1, False, out=reduced)
        # A_ts: the weighted sum of a tile's query groups as one batched product (a reduction
        # over rows, not over the 8-wide innermost axis), then over the tile's key groups
        coef = weight[a0:a1].expand(b, h, a1 - a0).reshape(-1, 1, per_tile)
        by_tile = torch.bmm(coef, reduced.view(-1, per_tile, width))
        shares[..., t0:t1, :reach] = by_tile.view(b, h, t1 - t0, reach, per_tile).sum(-1)
    total = shares.sum(-1, keepdim=True)
    return shares / torch.where(total > 0, total, torch.ones_like(total))


def tiles_from_mask(keep: torch.Tensor, layout: TileLayout) -> KeyBlocks:
    """The key tiles marked in ``keep`` (b, h, T_q, T_k) as slots, the marked ones first."""
    counts = keep.sum(-1)
    slots = int(counts.max()) if counts.numel() else 0
    order = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices
    valid = torch.arange(slots, device=keep.device) < counts.unsqueeze(-1)
    return KeyBlocks.from_tiles(order[..., :slots], valid, layout.block, layout.n_k)


def cumulative_tiles(
    shares: torch.Tensor, tau: float, cap: int, layout: TileLayout
) -> torch.Tensor:
    """(b, h, T_q, T_k) bool: per query tile its diagonal tiles, then the allowed tiles in
    descending share while the shares kept before them are below ``tau`` (τ ≥ 1: every allowed
    tile, whatever the rounding of the sums), at most ``cap`` tiles (never fewer than the
    diagonal's)."""
    device = shares.device
    allowed = layout.allowed_mask().to(device)
    diagonal = layout.diagonal_mask().to(device)
    ranked = shares.masked_fill(~allowed, float("-inf")).masked_fill(diagonal, float("inf"))
    # only the first ``cap`` of the ranking can be kept: a partial selection, not a full sort
    diagonal_count = diagonal.sum(-1, keepdim=True)
    width = min(layout.key_tiles, max(cap, int(diagonal_count.max()) if diagonal.numel() else 0))
    order = torch.topk(ranked, width, dim=-1).indices  # in descending order
    sorted_shares = shares.masked_fill(~allowed, 0.0).gather(-1, order)
    before = sorted_shares.cumsum(-1) - sorted_shares
    keep = allowed.expand_as(shares).gather(-1, order)
    if tau < 1:
        keep = keep & (before < tau)
    rank = torch.arange(width, device=device)
    cap = torch.clamp(diagonal_count, min=cap)
    keep = (keep & (rank < cap)) | diagonal.expand_as(shares).gather(-1, order)
    chosen = torch.zeros(shares.shape, dtype=torch.bool, device=device)
    return chosen.scatter_(-1, order, keep)


def capped_tiles(keys: int, layout: TileLayout) -> torch.Tensor:
    """(T_q,) the most tiles a threshold rule capped at ``keys`` keys per query keeps: the cost
    models' upper bound (the call's own count is the realised one)."""
    low = layout.diagonal_mask().sum(-1)
    wanted = torch.full_like(low, -(-keys // layout.block))
    return torch.minimum(torch.maximum(wanted, low), layout.allowed_tiles())


@register
class XAttention(PerSlice):
    name = "xattention"
    summary = (
        "XAttention: tiles scored by their strided antidiagonals, kept until a share τ of the "
        "estimated attention."
    )
    paper = "Xu, Guo, Tang, Han, ICML 2025 (XAttention)"
    budget_help = (
        f"m = the most keys a query may read (`keys`): at most ⌈m/B⌉ tiles of B = {BLOCK} per "
        "query tile; `tau` chooses the tiles below that cap, and the keys column reports what "
        "the call read (the same under `--budget-mode keys`)."
    )
    params = (
        Param("tau", float, 0.9, "share of each query tile's estimated attention kept (τ)",
              0.0, 1.0),
        Param("stride", int, STRIDE, "antidiagonal stride S (divides `block`)", 1, 256),
        CAP_PARAM,
        BLOCK_PARAM,
    )  # fmt: skip
    cost_help = (
        "2·n_q·n_k·d/S for the antidiagonal scores (half of it causal) and their softmax, "
        "then the kept pairs, 2·(d + d_v) + 3 each."
    )

    @classmethod
    def params_for_budget(cls, budget):
        return {"keys": budget}

    @classmethod
    def exact_limit(cls, n_q, n_k):
        return {"tau": 1.0, "keys": max(n_k, 1)}  # every allowed tile is kept

    def check_config(self):
        stride, block = self.config["stride"], self.config["block"]
        if block % stride:
            raise ParameterError(
                f"{self.name}: `stride` must divide `block` (the antidiagonals tile each key "
                f"tile); got stride={stride}, block={block}."
            )

    def choose(self, q, k, scale, mask, generator):
        layout = self.layout(q.shape[-2], k.shape[-2], mask)
        shares = antidiagonal_shares(q, k, scale, self.config["stride"], layout)
        cap = -(-self.config["keys"] // layout.block)
        return tiles_from_mask(cumulative_tiles(shares, self.config["tau"], cap, layout), layout)

    def model_tiles(self, layout):
        return capped_tiles(self.config["keys"], layout)  # τ keeps fewer: the realised count

    def couples_queries(self):
        # a cap of one tile keeps the diagonal alone, whatever the tile's queries
        return self.config["keys"] > self.config["block"]

    def scoring_flops(self, b, h, n_q, n_k, d):
        # the reduced product and its softmax, over the (n_q/S) × (n_k/S) groups
        stride = self.config["stride"]
        return float(b * h * (n_q * n_k * 2 * d / stride + 5 * n_q * n_k / stride**2))

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        layout = self.layout(n_q, n_k, FULL)
        tiles = layout.query_tiles * layout.key_tiles
        # the reduced logits of one chunk (and their probabilities), the shares and their sort
        scoring = itemsize * (2 * SCORE_ELEMENTS + 3 * b * h * tiles) + 9 * b * h * tiles
        return super().memory_bytes(b, h, n_q, n_k, d, d_v, itemsize) + float(scoring)
