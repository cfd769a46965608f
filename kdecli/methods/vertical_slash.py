"""vertical_slash (Jiang et al., NeurIPS 2024, MInference): the attention's lines, from its last rows.

Many heads put their attention on a few *vertical* lines (keys every query reads: the first token,
separators) and a few *slash* lines (fixed offsets o = i − j: the local window, periodic
patterns).  MInference estimates both from the last ``last_q`` queries (default 64), whose
attention over every key is computed exactly,

    P_ij = softmax_j(scale·q_i·k_j : j ≤ p_i),   i among the last last_q queries (position p_i),
    vertical score  c_j = Σ_i P_ij,               slash score  s_o = Σ_i P_{i, p_i − o},

and keeps the ``vertical`` columns of highest c_j and the ``slash`` offsets of highest s_o (the
offsets o ≥ 0 under a causal mask).  A query tile t of B = ``block`` rows, the first at
position f_t (causal: the start of its diagonal key tile, ``kdecli.methods.tiles``), then reads

  * the kept columns, as single key positions (the causal mask drops those after a query),
  * for each kept offset o the key range [f_t − o, f_t − o + B − 1]: the line through the tile,
    computed as a block of B keys as MInference's kernel does,
  * its diagonal: the range of the offset o = 0, kept always,

each key once (ranges that overlap and columns inside a range are merged).  The ranges of a tile
are the same offsets relative to f_t for every tile, so their union is computed once per head:
the relative offsets r = f_t − j covered are ∪_o [o − B + 1, o].

Budget m = keys per query.  ``--budget-mode paper`` reads it as MInference's configurations
do, ``vertical_size`` + ``slash_size`` lines with a line one key per query: ⌈m/2⌉ columns and
⌈m/2⌉ offsets; the kernel computes each slash line as a block of B keys, so a query can read
more than m keys (the keys column reports the realised count).  ``--budget-mode keys``: the
diagonal's B keys, then r = m − B split between ⌊r/(2B)⌋ slash lines of B keys and the rest in
columns (at the default B = 64), so that a query reads at most m keys.

The choice reads the last queries and every key, as in a deployed prefill: a later key can move
the lines an earlier query reads (never a later key or value into its output: the kernel masks
each query's keys by position).  Exact when the lines cover every allowed key.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kdecli.masks import FULL
from kdecli.methods.base import Param
from kdecli.methods.registry import register
from kdecli.methods.tiles import (
    BLOCK,
    BLOCK_PARAM,
    KeyBlocks,
    TileLayout,
    TileSparse,
    attend_blocks,
)

LAST_Q = 64  # MInference's estimate: the last 64 queries


class Lines(NamedTuple):
    """The lines a head keeps: ``columns`` (b, h, V) key positions and ``offsets`` (b, h, S)
    values of o = i − j, with ``column_valid`` and ``offset_valid`` saying which slots hold one
    (a head may keep fewer lines than the slots: ``flexprefill``'s per-head counts)."""

    columns: torch.Tensor
    column_valid: torch.Tensor
    offsets: torch.Tensor
    offset_valid: torch.Tensor


def last_query_attention(
    q_last: torch.Tensor, k: torch.Tensor, scale: float, last: int, causal: bool
) -> torch.Tensor:
    """(b, h, L, n_k) the exact attention of the last L queries, P_ij = softmax_j(scale·q_i·k_j),
    the i-th at position ``last`` − L + 1 + i; under a causal mask over the keys j ≤ its
    position only."""
    logits = (q_last * scale) @ k.transpose(-1, -2)
    if causal:
        n_last, n_k = q_last.shape[-2], k.shape[-2]
        positions = torch.arange(last - n_last + 1, last + 1, device=k.device).unsqueeze(-1)
        logits.masked_fill_(torch.arange(n_k, device=k.device) > positions, float("-inf"))
    return torch.softmax(logits, dim=-1)


def line_scores(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertical, slash) sums of the last queries' attention ``probs`` (b, h, L, n_k):
    vertical (b, h, n_k), c_j = Σ_i P_ij; slash (b, h, n_k + L − 1) indexed by u = p_last − o,
    the distance of the line below the last query (o = i − j; u > p_last: a line above the
    main diagonal, o < 0), s_o = Σ_i P_{i, p_i − o}.

    The diagonal sums are one strided copy and one sum: row i of ``probs`` is written into a
    zero matrix shifted right by L − 1 − i, so that the entry (i, j), whose offset is
    o = p_last − (L − 1 − i + j), lands in column u = L − 1 − i + j."""
    *lead, n_last, n_k = probs.shape
    width = n_k + n_last - 1
    shifted = probs.new_zeros(*lead, n_last, width)
    lead_strides = shifted.stride()[:-2]
    # element (i, j) at i·width + (L − 1 − i + j) = (L − 1) + i·(width − 1) + j
    view = shifted.as_strided(
        (*lead, n_last, n_k), (*lead_strides, width - 1, 1), shifted.storage_offset() + n_last - 1
    )
    view.copy_(probs)
    return probs.sum(-2), shifted.sum(-2)


def top_lines(
    vertical: torch.Tensor,
    slash: torch.Tensor,
    columns: int,
    offsets: int,
    last: int,
    causal: bool,
) -> Lines:
    """The ``columns`` keys of highest vertical score and the ``offsets`` lines of highest slash
    score (``line_scores``'s index u = ``last`` − o; under a causal mask only o ≥ 0, the lines
    at or below the main diagonal)."""
    n_k, width = vertical.shape[-1], slash.shape[-1]
    columns, offsets = min(columns, n_k), min(offsets, width)
    chosen_columns = torch.topk(vertical, columns, dim=-1).indices
    if causal:
        below = torch.arange(width, device=slash.device) <= last
        slash = slash.masked_fill(~below, float("-inf"))
        offsets = min(offsets, last + 1)
    top = torch.topk(slash, offsets, dim=-1)
    return Lines(
        chosen_columns,
        torch.ones_like(chosen_columns, dtype=torch.bool),
        last - top.indices,
        top.values > float("-inf"),
    )


def line_keys(
    lines: Lines,
    first: torch.Tensor,
    final: torch.Tensor,
    block: int,
    n_k: int,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, valid), each (b, h, T, slots): the key positions query tile t reads, its first
    query at position ``first[t]`` and its last at ``final[t]``: the slash ranges
    [f_t − o, f_t − o + B − 1] of the kept offsets and of o = 0 (the diagonal), then the kept
    columns not inside a range; each key once, none outside [0, n_k) nor, under a causal
    mask, after ``final[t]``.

    Relative to f_t a range covers r = f_t − j ∈ [o − B + 1, o], the same for every tile, so the
    covered set is computed once per head, on the index w = o_top − r (o_top the largest
    offset, w ≥ 0): a kept line at w₀ = o_top − o covers w ∈ [w₀, w₀ + B − 1]."""
    offsets, offset_valid = lines.offsets, lines.offset_valid
    lead = offsets.shape[:-1]
    zero = torch.zeros(*lead, 1, dtype=offsets.dtype, device=offsets.device)
    offsets = torch.cat([zero, offsets], dim=-1)  # the diagonal, always
    offset_valid = torch.cat([torch.ones_like(zero, dtype=torch.bool), offset_valid], dim=-1)
    top = int(offsets.masked_fill(~offset_valid, 0).max())
    low = int(offsets.masked_fill(~offset_valid, top).min())
    span = top - low + block  # w ∈ [0, top − low + B − 1]
    starts = torch.zeros(*lead, span + 1, dtype=torch.int32, device=offsets.device)
    w0 = (top - offsets).masked_fill(~offset_valid, span)  # an invalid slot marks the spare
    starts.scatter_add_(-1, w0, torch.ones_like(w0, dtype=torch.int32))
    starts = starts[..., :span]
    # w is covered when a line starts in [w − B + 1, w]: a window sum of the start counts
    running = torch.nn.functional.pad(starts.cumsum(-1), (block, 0))
    covered = (running[..., block:] - running[..., :-block]) > 0

    # the covered w of each head in ascending order, as slots (a head with fewer pads)
    count = covered.sum(-1)
    slots = int(count.max())
    w = torch.sort(covered.to(torch.int8), dim=-1, descending=True, stable=True).indices
    w = w[..., :slots]
    slot_valid = torch.arange(slots, device=w.device) < count.unsqueeze(-1)
    shift = (first - top).view(1, 1, -1, 1)  # j = f_t − r = f_t − top + w
    ranges = w.unsqueeze(-2) + shift
    range_valid = slot_valid.unsqueeze(-2) & (ranges >= 0) & (ranges < n_k)

    columns = lines.columns.unsqueeze(-2).expand(*lead, first.shape[0], -1)
    w_col = columns - shift  # the column's w in each tile
    inside = (w_col >= 0) & (w_col < span)
    b, h = lead
    looked = covered.gather(-1, w_col.clamp(0, span - 1).reshape(b, h, -1)).view_as(w_col)
    column_valid = lines.column_valid.unsqueeze(-2) & ~(inside & looked)
    if causal:
        last = final.view(1, 1, -1, 1)
        range_valid &= ranges <= last
        column_valid &= columns <= last
    index = torch.cat([ranges.clamp(0, n_k - 1), columns], dim=-1)
    return index, torch.cat([range_valid, column_valid], dim=-1)


class PerSlice(TileSparse):
    """A tile rule whose slot counts differ between slices (data-driven ones): the kernel runs
    slice by slice, so that no slice's rounding depends on another's counts (the kernel's
    chunks of query tiles may span slices, and a chunk reads up to its largest count)."""

    def forward_full(self, q, k, v, scale, generator):
        return self.attend_slices(q, k, v, scale, FULL, self.blocks(q, k, scale, generator, FULL))

    def forward_causal(self, q, k, v, scale, generator, mask):
        return self.attend_slices(q, k, v, scale, mask, self.blocks(q, k, scale, generator, mask))

    @staticmethod
    def attend_slices(q, k, v, scale, mask, blocks: KeyBlocks) -> torch.Tensor:
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
        for i in range(q.shape[0]):
            for j in range(q.shape[1]):
                one = KeyBlocks(
                    blocks.index[i : i + 1, j : j + 1],
                    blocks.valid[i : i + 1, j : j + 1],
                    blocks.span,
                    blocks.block,
                )
                part = (x[i : i + 1, j : j + 1] for x in (q, k, v))
                out[i : i + 1, j : j + 1] = attend_blocks(*part, scale, mask, one)
        return out


@register
class VerticalSlash(PerSlice):
    name = "vertical_slash"
    summary = (
        "MInference's vertical-slash: columns and diagonals ranked by the last queries' "
        "attention, read as blocks."
    )
    paper = "Jiang et al., NeurIPS 2024 (MInference)"
    budget_help = (
        "m = keys per query: ⌈m/2⌉ columns (`vertical`) and ⌈m/2⌉ slash lines (`slash`), a "
        "line one key per query as in MInference's configurations; the kernel reads a slash line "
        "as a block of B keys per query tile, so the realised keys can exceed m.  Under "
        f"`--budget-mode keys`: the diagonal's B = {BLOCK} keys, then r = m − B as ⌊r/(2B)⌋ "
        "slash lines and r − B·⌊r/(2B)⌋ columns: at most m keys per query."
    )
    params = (
        Param("vertical", int, 1000, "columns (keys every query reads) kept", 0, 2**24),
        Param("slash", int, 6096, "slash lines (offsets i − j) kept", 0, 2**24),
        Param("last_q", int, LAST_Q, "last queries whose attention ranks the lines", 1, 2**16),
        BLOCK_PARAM,
    )
    causal_query_coupled = True  # the lines are ranked from the last queries over every key
    causal_choice_reads_ahead = True  # ... over every key, later ones included
    cost_help = (
        "2·last_q·n_k·d for the estimate, then the kept pairs (the columns, the slash blocks and "
        "the diagonal), 2·(d + d_v) + 3 each."
    )

    @classmethod
    def params_for_budget(cls, budget):
        half = math.ceil(budget / 2)
        return {"vertical": half, "slash": half}

    @classmethod
    def params_for_keys(cls, budget):
        rest = max(budget - BLOCK, 0)  # after the diagonal block
        lines = rest // (2 * BLOCK)
        return {"vertical": rest - lines * BLOCK, "slash": lines}

    @classmethod
    def exact_limit(cls, n_q, n_k):
        return {"vertical": max(n_k, 1)}  # every column is kept: every key

    def lines(self, q: torch.Tensor, k: torch.Tensor, scale: float, layout: TileLayout) -> Lines:
        """The kept columns and offsets, ranked from the last ``last_q`` queries."""
        last_q = min(self.config["last_q"], layout.n_q, layout.n_k)
        last = int(layout.last_positions()[-1])
        probs = last_query_attention(q[..., -last_q:, :], k, scale, last, layout.causal)
        vertical, slash = line_scores(probs)
        columns, offsets = self.config["vertical"], self.config["slash"]
        return top_lines(vertical, slash, columns, offsets, last, layout.causal)

    def choose(self, q, k, scale, mask, generator):
        layout = self.layout(q.shape[-2], k.shape[-2], mask)
        return lines_as_blocks(self.lines(q, k, scale, layout), layout)

    def couples_queries(self):
        # without lines a tile reads its diagonal alone, whatever the last queries
        return self.config["vertical"] + self.config["slash"] > 0

    def model_pairs(self, n_q, n_k, mask):
        # at most the columns and a block of B keys per slash line, of the keys a tile may list
        layout = self.layout(n_q, n_k, mask)
        lines = self.config["vertical"] + self.config["slash"] * layout.block
        sizes = layout.query_sizes()
        if layout.causal:  # the keys before the tile's first position, then its diagonal
            listed = layout.first_positions().clamp(max=lines)
            return float((listed * sizes).sum() + layout.near_pairs().sum())
        return float(min(lines + layout.block, n_k) * sizes.sum())

    def scoring_flops(self, b, h, n_q, n_k, d):
        # the last queries' logits and softmax, then the column and diagonal sums
        return float(b * h * min(self.config["last_q"], n_q) * n_k * (2 * d + 6))

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        base = super().memory_bytes(b, h, n_q, n_k, d, d_v, itemsize)
        last_q = min(self.config["last_q"], n_q)
        layout = self.layout(n_q, n_k, FULL)
        lines = min(self.config["slash"] * layout.block, n_k + layout.block)
        slots = self.config["vertical"] + lines
        # the estimate and its shifted copy, and the slots (int64 and bool) of every tile, twice
        # (the union of columns and lines is deduplicated through a sorted copy of them), then
        # the kernel's gathered row and masks for each
        return (
            base
            + float(2 * b * h * last_q * (n_k + last_q) * itemsize)
            + float(29 * b * h * layout.query_tiles * slots)
        )


def lines_as_blocks(lines: Lines, layout: TileLayout) -> KeyBlocks:
    """The key positions of ``line_keys`` for every query tile of ``layout``."""
    # causal: the tile's rows start on the key grid, at its diagonal tile; FULL: its first query
    first = layout.tile_starts() if layout.causal else layout.first_positions()
    device = lines.columns.device
    first, final = first.to(device), layout.last_positions().to(device)
    index, valid = line_keys(lines, first, final, layout.block, layout.n_k, layout.causal)
    return KeyBlocks.from_positions(index, valid, layout.block)
