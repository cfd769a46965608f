"""Block-sparse prefill: the tile geometry, the kernel, and the base class of the tile methods.

The n_q × n_k logit matrix is cut into tiles of B × B (``block``, default ``BLOCK`` = 64).  Key
tile r holds the keys [r·B, min((r+1)·B, n_k)) (a ragged last tile).  A method lists, per query
tile, the key positions the tile's queries read, and the kernel computes exact softmax attention of
each query over them:

    Õ_i = Σ_{j∈S_i} e^{ℓ_ij} v_j / Σ_{j∈S_i} e^{ℓ_ij},   ℓ_ij = scale · q_i·k_j

Where a query sits (``TileLayout``): under ``Causal(offset)`` query i is at position p_i = offset
+ i, S_i ⊆ {j ≤ p_i}, and the query tiles sit on the key grid: query tile t holds the queries whose
positions fall in [s_t, s_t + B), s_t = (⌊offset/B⌋ + t)·B, so its *diagonal* is the one key tile
at s_t, and a chunk of a prefill after a prefix is tiled as the whole prefill is (the first tile
holds ``lead`` = offset mod B empty rows; with offset 0, tile t is the queries [t·B, (t+1)·B)).
Under ``FULL`` every key is allowed and query tile t is the queries [t·B, (t+1)·B); they are aligned
bottom-right on the keys, p_i = clamp(i + n_k − n_q, 0, n_k − 1), which says only where a tile's
diagonal is (the key tiles holding those positions: the tile t when n_q = n_k).
``TileLayout.tile_rows`` and ``pooled_queries`` arrange the queries by tile for a scoring pass.

The public API (the family's seam; ``blocktopk``, ``topk_tiles``, ``vertical_slash``,
``xattention`` and ``flexprefill`` are written against it):

``KeyBlocks(index, valid, span, block)``: what a method chooses.  ``index`` (b, h, T_q, L) int64
    and ``valid`` (b, h, T_q, L) bool: L *slots* per query tile; a valid slot covers the key
    positions [index, index + span) (clipped at n_k); an invalid one covers nothing.  ``span`` is
    1 for slots of single keys and B for whole key tiles (``KeyBlocks.from_tiles``), so a tile
    choice holds one integer per tile, not B.  Slots of one tile must not overlap: a position
    covered twice would weigh twice (``KeyBlocks.cat`` merges choices, dropping repeats).
    Under a causal mask the kernel always computes the diagonal key tile itself, masked
    element-wise (key j weighs nothing for a query before it): a method lists what it keeps
    *before* the tile's start s_t, and whatever it lists from s_t on is covered by the diagonal
    (so it never worries about the triangle).  Under ``FULL`` the listed slots are the whole
    set: list the diagonal tiles (``diagonal_tiles``, or ``top_tiles``) to keep them.
``TileLayout.of(n_q, n_k, block, mask)``: the geometry above (tile counts, tile starts, first and
    last query positions, the diagonal, the tiles a query tile may read, allowed pairs).
``top_tiles(scores, counts, layout)``: the ``counts[t]`` key tiles of highest score for each
    query tile, its diagonal tiles always among them, never a tile after its last position.
``attend_blocks(q, k, v, scale, mask, blocks)`` -> (b, h, n_q, d_v): the kernel (exact softmax of
    each query over its set, the diagonal always present, causally masked).
``TileSparse``: the base class.  A subclass sets ``params`` (``BLOCK_PARAM`` plus its own) and
    implements ``choose(q, k, scale, mask, generator) -> KeyBlocks`` (q, k in the working dtype,
    ``mask`` FULL or Causal(offset) with offset + n_q = n_k); the base class provides the
    forward under both masks, ``key_sets`` from the same ``choose`` (``exact_over_set``), the
    realised keys per query and density (``realised_keys_per_query``, ``realised_density``:
    counted from the call's own choice, never the declared budget), ``flops`` (kept pairs plus
    ``scoring_flops``), ``memory_bytes``, and ``keys_per_query`` from ``model_tiles`` (the tiles
    it expects to keep per query tile; None: not modelled, the realised count stands).
``TopTiles``: the count-driven subclass (``blocktopk``, ``topk_tiles``): params ``keys`` (kept keys
    per query, the budget: ⌈keys/B⌉ tiles per query tile, diagonal included) or ``density`` (a
    share of each query tile's allowed tiles, when > 0), and ``tile_scores(q, k, scale, layout)
    -> (b, h, T_q, T_k)`` to rank the tiles.

The kernel (``attend_blocks``): the query tiles of every slice run in chunks; per chunk one
``index_select`` of the listed keys and one of their values (whole tiles as single B·d rows, when
the slots are tiles), one batched product for the logits, the fused softmax in place and one
batched product for the output, into buffers allocated once per call (a fresh buffer per chunk
costs as much in page faults as the arithmetic).  The causal triangle is an additive −∞ mask on
the diagonal block; a slot position not read (padding to the chunk's widest tile, a tile's keys
past n_k or past the diagonal's start) gets −∞ in a chunk that has one, and no chunk pays a pass
for it otherwise.  Time grows with the kept pairs, memory with n·d and the kept slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdecli.masks import FULL, Causal, Mask
from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.common import working_dtype
from kdecli.methods.keysets import KeySets

BLOCK = 64  # tile side B
BLOCK_PARAM = Param("block", int, BLOCK, "tile side B: queries and keys per tile", 16, 256)
# Elements of one chunk's gathered keys (and of its gathered values, and of its logits) held at
# once: the chunk of ``attend_blocks``, 4 MB each in float32, so that a chunk's three buffers stay
# in a CPU's last-level cache between the products and the softmax (at n = 65,536 the kernel ran
# 10-20 % faster than with 32 MB buffers).
CHUNK_ELEMENTS = 2**20
MAX_CHUNK_TILES = 16  # more query tiles per chunk stop paying: the products are already large

PREFILL_ONLY = (
    "a tile rule chooses key tiles for a tile of queries, and a decode step is one query: "
    "compare the KV-cache methods there"
)


@dataclass(frozen=True)
class TileLayout:
    """The tile geometry of n_q × n_k inputs under a mask (module docstring)."""

    n_q: int
    n_k: int
    block: int
    causal: bool
    offset: int  # causal: query i sits at offset + i; FULL: n_k − n_q (may be negative)

    @classmethod
    def of(cls, n_q: int, n_k: int, block: int, mask: Mask) -> TileLayout:
        if mask.is_causal:
            return cls(n_q, n_k, block, True, mask.offset)
        return cls(n_q, n_k, block, False, n_k - n_q)

    def mask(self) -> Mask:
        """The mask the layout was made under."""
        return Causal(self.offset) if self.causal else FULL

    @property
    def lead(self) -> int:
        """Empty rows before the first query in its tile: offset mod B under a causal mask (the
        tiles sit on the key grid), 0 under FULL."""
        return self.offset % self.block if self.causal else 0

    @property
    def query_tiles(self) -> int:
        return -(-(self.lead + self.n_q) // self.block)

    @property
    def key_tiles(self) -> int:
        return -(-self.n_k // self.block)

    def tile_of(self, queries: torch.Tensor) -> torch.Tensor:
        """The query tile of each query index in ``queries``."""
        return (queries + self.lead) // self.block

    def tile_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(b, h, n_q, ·) -> (b, h, T_q, B, ·): the queries by tile, empty rows zero."""
        b, h, n_q, width = x.shape
        rows = x.new_zeros(b, h, self.query_tiles * self.block, width)
        rows[..., self.lead : self.lead + n_q, :] = x
        return rows.unflatten(-2, (self.query_tiles, self.block))

    def pooled_queries(self, x: torch.Tensor) -> torch.Tensor:
        """(b, h, T_q, ·): the mean of each query tile's queries (its members only)."""
        sums = self.tile_rows(x).sum(-2)
        return sums / self.query_sizes().to(device=x.device, dtype=x.dtype).unsqueeze(-1)

    def query_sizes(self) -> torch.Tensor:
        """(T_q,) queries in each query tile (B; the first and last possibly fewer)."""
        starts = torch.arange(self.query_tiles) * self.block
        return (starts + self.block).clamp(max=self.lead + self.n_q) - starts.clamp(min=self.lead)

    def key_sizes(self) -> torch.Tensor:
        """(T_k,) keys in each key tile."""
        starts = torch.arange(self.key_tiles) * self.block
        return (self.n_k - starts).clamp(max=self.block)

    def tile_starts(self) -> torch.Tensor:
        """(T_q,) the key position of each query tile's first row (causal: the start of its
        diagonal key tile; FULL: its first query's position, possibly negative)."""
        return torch.arange(self.query_tiles) * self.block + self.offset - self.lead

    def first_positions(self) -> torch.Tensor:
        """(T_q,) the key position of each query tile's first query."""
        first = self.tile_starts() + (torch.arange(self.query_tiles) == 0) * self.lead
        return first.clamp(0, self.n_k - 1)

    def last_positions(self) -> torch.Tensor:
        """(T_q,) the key position of each query tile's last query."""
        ends = self.tile_starts() + (self.block - 1)
        return ends.clamp(max=self.offset + self.n_q - 1).clamp(0, self.n_k - 1)

    def diagonal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, last) key tiles of each query tile's diagonal, (T_q,) each: one tile under a
        causal mask; under FULL with n_q ≠ n_k possibly two."""
        return self.first_positions() // self.block, self.last_positions() // self.block

    def diagonal_mask(self) -> torch.Tensor:
        """(T_q, T_k) bool: the key tiles of each query tile's diagonal."""
        first, last = self.diagonal()
        tiles = torch.arange(self.key_tiles)
        return (tiles >= first.unsqueeze(-1)) & (tiles <= last.unsqueeze(-1))

    def allowed_tiles(self) -> torch.Tensor:
        """(T_q,) key tiles some query of the tile may read: those up to its diagonal (causal),
        every one (FULL)."""
        if self.causal:
            return self.last_positions() // self.block + 1
        return torch.full((self.query_tiles,), self.key_tiles, dtype=torch.int64)

    def allowed_mask(self) -> torch.Tensor:
        """(T_q, T_k) bool: the tiles of ``allowed_tiles``."""
        return torch.arange(self.key_tiles) < self.allowed_tiles().unsqueeze(-1)

    def allowed_pairs(self) -> int:
        """Allowed (query, key) pairs: Σ_i (p_i + 1) causal, n_q·n_k full."""
        if not self.causal:
            return self.n_q * self.n_k
        return self.n_q * (self.offset + 1) + self.n_q * (self.n_q - 1) // 2

    def near_pairs(self) -> torch.Tensor:
        """(T_q,) pairs of the causal diagonal of each tile: Σ over its queries of the keys
        from the tile's start to the query's own position; 0 under FULL."""
        if not self.causal:
            return torch.zeros(self.query_tiles, dtype=torch.int64)
        first = self.first_positions() - self.tile_starts() + 1  # the first query's count
        last = self.last_positions() - self.tile_starts() + 1
        return (first + last) * self.query_sizes() // 2

    def far_limit(self) -> torch.Tensor:
        """(T_q,) the listed positions a tile computes are those below this: the start of its
        diagonal tile (causal: the kernel computes that tile itself) or n_k (FULL)."""
        if self.causal:
            return self.tile_starts()
        return torch.full((self.query_tiles,), self.n_k, dtype=torch.int64)


@dataclass(frozen=True)
class KeyBlocks:
    """The keys each query tile reads: slots of ``span`` consecutive positions (module
    docstring).  ``index``, ``valid``: (b, h, T_q, L)."""

    index: torch.Tensor
    valid: torch.Tensor
    span: int
    block: int

    @classmethod
    def from_tiles(
        cls, tiles: torch.Tensor, valid: torch.Tensor, block: int, n_k: int
    ) -> KeyBlocks:
        """Whole key tiles (b, h, T_q, R) int64 tile indices (a ragged last tile is clipped at
        n_k by every reader); ``valid`` which of the R hold a tile."""
        last = max(0, -(-n_k // block) - 1)
        return cls(tiles.clamp(0, last) * block, valid, block, block)

    @classmethod
    def from_positions(cls, positions: torch.Tensor, valid: torch.Tensor, block: int) -> KeyBlocks:
        """Single keys: (b, h, T_q, L) int64 positions and which slots hold one."""
        return cls(positions, valid, 1, block)

    def positions(self, n_k: int) -> KeyBlocks:
        """The same choice with slots of one key (span 1): (b, h, T_q, L·span)."""
        if self.span == 1:
            return self
        index = self.index.unsqueeze(-1) + torch.arange(self.span, device=self.index.device)
        valid = self.valid.unsqueeze(-1) & (index < n_k)
        return KeyBlocks(index.flatten(-2).clamp(max=n_k - 1), valid.flatten(-2), 1, self.block)

    @classmethod
    def cat(cls, parts: list[KeyBlocks], n_k: int) -> KeyBlocks:
        """The union of several choices for the same query tiles, as single keys (span 1): a
        position that several slots cover is kept once.  Merge with it whenever parts may
        overlap (columns inside a kept tile, say)."""
        flat = [part.positions(n_k) for part in parts]
        index = torch.cat([part.index for part in flat], dim=-1)
        valid = torch.cat([part.valid for part in flat], dim=-1)
        # sort the valid positions first and ascending; a repeat is the same as its left neighbour
        key = torch.where(valid, index, torch.full_like(index, n_k))
        key = torch.sort(key, dim=-1).values
        repeat = torch.zeros_like(valid)
        repeat[..., 1:] = key[..., 1:] == key[..., :-1]
        return cls(key.clamp(max=n_k - 1), (key < n_k) & ~repeat, 1, parts[0].block)

    def covered(self, layout: TileLayout) -> torch.Tensor:
        """(b, h, T_q, L) listed positions each slot adds to what the tile computes: those
        below the tile's ``far_limit`` (the causal diagonal is counted apart)."""
        limit = layout.far_limit().to(self.index.device).view(-1, 1)
        count = (torch.minimum(self.index + self.span, limit) - self.index).clamp(0, self.span)
        return torch.where(self.valid, count, torch.zeros_like(count))

    def pairs(self, layout: TileLayout) -> torch.Tensor:
        """(b, h) the (query, key) pairs the kernel computes over these blocks, each allowed by
        the mask: the listed keys times the tile's queries, plus the causal diagonal."""
        sizes = layout.query_sizes().to(self.index.device)
        listed = (self.covered(layout).sum(-1) * sizes).sum(-1)
        return listed + int(layout.near_pairs().sum())

    def query_sets(
        self, layout: TileLayout, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, valid), each (b, h, stop − start, m): the key positions queries [start,
        stop) read (``KeySets.from_index``)."""
        device = self.index.device
        queries = torch.arange(start, stop, device=device)
        tile = layout.tile_of(queries)
        # the chunk's tiles first, then their slots as single keys (never every tile's)
        mine = KeyBlocks(self.index[..., tile, :], self.valid[..., tile, :], self.span, self.block)
        flat = mine.positions(layout.n_k)
        limit = layout.far_limit().to(device)[tile].view(-1, 1)
        index = flat.index
        valid = flat.valid & (index < limit)
        if layout.causal:
            tile_start = layout.tile_starts().to(device)[tile]
            near = tile_start.unsqueeze(-1) + torch.arange(layout.block, device=device)
            own = (queries + layout.offset).unsqueeze(-1)
            lead = index.shape[:2]
            index = torch.cat([index, near.clamp(max=layout.n_k - 1).expand(*lead, -1, -1)], -1)
            valid = torch.cat([valid, (near <= own).expand(*lead, -1, -1)], -1)
        return index, valid


def diagonal_tiles(layout: TileLayout, lead: tuple[int, int], device=None) -> KeyBlocks:
    """The diagonal tiles of every query tile, (b, h, T_q, 2) slots (one invalid where the
    diagonal is a single tile): what a method lists to keep the diagonal under ``FULL``."""
    first, last = layout.diagonal()
    tiles = torch.stack([first, last], dim=-1).to(device)
    valid = torch.stack([torch.ones_like(first, dtype=torch.bool), last > first], -1).to(device)
    shape = (*lead, layout.query_tiles, 2)
    return KeyBlocks.from_tiles(tiles.expand(shape), valid.expand(shape), layout.block, layout.n_k)


def top_tiles(scores: torch.Tensor, counts: torch.Tensor, layout: TileLayout) -> KeyBlocks:
    """For each query tile t the ``counts[t]`` allowed key tiles of highest ``scores`` (b, h,
    T_q, T_k), the diagonal tiles first whatever their score; never a tile after the tile's last
    position (causal).  ``counts`` (T_q,) is clipped to [diagonal tiles, allowed tiles]."""
    device = scores.device
    allowed = layout.allowed_mask().to(device)
    diagonal = layout.diagonal_mask().to(device)
    ranked = scores.masked_fill(~allowed, float("-inf")).masked_fill(diagonal, float("inf"))
    low = diagonal.sum(-1)
    counts = torch.minimum(torch.maximum(counts.to(device), low), layout.allowed_tiles().to(device))
    keep = int(counts.max()) if counts.numel() else 0
    top = torch.topk(ranked, keep, dim=-1)
    valid = torch.arange(keep, device=device) < counts.unsqueeze(-1)
    return KeyBlocks.from_tiles(top.indices, valid, layout.block, layout.n_k)


def attend_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: Mask,
    blocks: KeyBlocks,
) -> torch.Tensor:
    """Exact softmax attention of each query over the keys its tile lists (the causal diagonal
    always present, masked), (b, h, n_q, d_v); ``mask`` FULL or Causal(offset) with offset + n_q
    = n_k (the base class's dispatch).  No autograd (in-place softmax)."""
    work = working_dtype(q.dtype)
    b, h, n_q, d = q.shape
    n_k, d_v = k.shape[-2], v.shape[-1]
    layout = TileLayout.of(n_q, n_k, blocks.block, mask)
    block, tiles, slices = layout.block, layout.query_tiles, b * h
    device = q.device

    queries = torch.zeros(slices, tiles * block, d, dtype=work, device=device)
    queries[:, layout.lead : layout.lead + n_q] = q.reshape(slices, n_q, d)
    queries.mul_(scale)
    queries = queries.view(slices * tiles, block, d)
    # keys and values on the key grid, a ragged last tile padded with zero rows: a whole tile
    # is then one row of a (tiles, B·d) view, gathered as one piece, and the diagonal tile's
    # B positions all exist
    grid = layout.key_tiles * block
    keys, values = (_on_grid(x, work, slices, grid) for x in (k, v))
    whole_tiles = blocks.span == block
    piece = block if whole_tiles else 1  # positions per gathered row
    keys = keys.view(-1, piece * d)
    values = values.view(-1, piece * d_v)
    base = (torch.arange(slices, device=device) * (grid // piece)).repeat_interleave(tiles)

    index, valid, counts = _compact(blocks, layout)
    index = index.reshape(slices * tiles, -1)
    valid = valid.reshape(slices * tiles, -1)
    counts = counts.reshape(-1)
    limit = layout.far_limit().to(device).repeat(slices).unsqueeze(-1)
    start = layout.tile_starts().to(device).repeat(slices).unsqueeze(-1)
    span = blocks.span
    near = block if layout.causal else 0
    triangle = torch.full((block, block), float("-inf"), dtype=work, device=device).triu(1)

    # Every tile's gathered rows, prepared once (a chunk then costs its products, not a dozen
    # small index operations): the diagonal tile first (causal), then the listed slots; a slot
    # not read gathers any row, its logits set to −∞.  A tile needs that mask when one of its
    # slots is not read in full (invalid, ragged, or reaching the diagonal's start) or when its
    # chunk pads it to a wider tile.
    diagonal_rows = (1 if whole_tiles else block) if near else 0  # gathered rows of the diagonal
    rows = torch.empty(
        slices * tiles, diagonal_rows + index.shape[-1], dtype=torch.long, device=device
    )
    listed = rows[:, diagonal_rows:]
    if whole_tiles:
        torch.div(index, block, rounding_mode="floor", out=listed)
    else:
        listed.copy_(index).masked_fill_(~(valid & (index < limit)), 0)
    if near:
        first = start // block if whole_tiles else start + torch.arange(block, device=device)
        rows[:, :diagonal_rows] = first
    rows += base.unsqueeze(-1)
    used = torch.arange(index.shape[-1], device=device) < counts.unsqueeze(-1)
    partial = (used & ~(valid & (index <= limit - span))).any(-1).tolist()
    count_of = counts.tolist()

    chunks, most = _chunks(counts.view(slices, tiles) * span + near, max(d, d_v, block))
    key_buffer = torch.empty(most * d, dtype=work, device=device)
    value_buffer = torch.empty(most * d_v, dtype=work, device=device)
    logit_buffer = torch.empty(most * block, dtype=work, device=device)
    out = torch.empty(slices * tiles, block, d_v, dtype=work, device=device)

    for s, e in chunks:
        c, slots = e - s, max(count_of[s:e])
        width = near + slots * span
        chunk_rows = rows[s:e, : diagonal_rows + slots].reshape(-1)
        gathered_k = torch.index_select(
            keys, 0, chunk_rows, out=key_buffer[: c * width * d].view(-1, piece * d)
        ).view(c, width, d)
        gathered_v = torch.index_select(
            values, 0, chunk_rows, out=value_buffer[: c * width * d_v].view(-1, piece * d_v)
        ).view(c, width, d_v)
        logits = torch.bmm(
            queries[s:e],
            gathered_k.transpose(1, 2),
            out=logit_buffer[: c * block * width].view(c, block, width),
        )
        if near:
            logits[:, :, :block] += triangle
        if any(partial[s:e]) or min(count_of[s:e]) < slots:
            position = index[s:e, :slots].unsqueeze(-1) + torch.arange(span, device=device)
            read = valid[s:e, :slots].unsqueeze(-1) & (position < limit[s:e].unsqueeze(-1))
            logits[:, :, near:].masked_fill_(~read.view(c, 1, -1), float("-inf"))
        # the fused softmax in place: one kernel, no second buffer
        torch.ops.aten._softmax.out(logits, -1, False, out=logits)
        torch.bmm(logits, gathered_v, out=out[s:e])
    result = out.view(slices, tiles * block, d_v)[:, layout.lead : layout.lead + n_q]
    return result.reshape(b, h, n_q, d_v).to(v.dtype)


def _on_grid(x: torch.Tensor, work: torch.dtype, slices: int, grid: int) -> torch.Tensor:
    """(slices, grid, ·) ``x`` in the working dtype, zero rows after its last: a view of it
    where nothing is to change."""
    n = x.shape[-2]
    x = x.to(work).reshape(slices, n, x.shape[-1])
    if n == grid:
        return x.contiguous()
    padded = x.new_zeros(slices, grid, x.shape[-1])
    padded[:, :n] = x
    return padded


def _chunks(widths: torch.Tensor, row_elements: int) -> tuple[list[tuple[int, int]], int]:
    """The chunks of query tiles, (start, stop) over the flattened (slice, tile) rows, and the
    most keys one chunk gathers.  ``widths`` (slices, T_q): keys each tile reads.  A chunk never
    spans two slices and its size comes from its own slice's widths, so that a slice's output,
    to the last bit, does not depend on the others (the products' rounding follows their
    width)."""
    slices, tiles = widths.shape
    chunks, most = [], 0
    for g, widest in enumerate(widths.amax(-1).tolist()):
        size = max(1, min(MAX_CHUNK_TILES, CHUNK_ELEMENTS // max(1, widest * row_elements)))
        chunks += [
            (s, min((g + 1) * tiles, s + size)) for s in range(g * tiles, (g + 1) * tiles, size)
        ]
        most = max(most, min(size, tiles) * widest)
    return chunks, most


def _compact(
    blocks: KeyBlocks, layout: TileLayout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index, valid, counts): the slots that add keys moved first in each tile (stable), so a
    chunk reads only up to its tiles' largest count; counts (b, h, T_q)."""
    useful = blocks.covered(layout) > 0
    counts = useful.sum(-1)
    if bool(useful.all()):
        return blocks.index, useful, counts
    order = torch.sort((~useful).to(torch.uint8), dim=-1, stable=True).indices
    return blocks.index.gather(-1, order), useful.gather(-1, order), counts


class _QueryCoupled:
    """``causal_query_coupled`` of a tile method: True on the class (the family chooses a
    tile's keys from all its queries, so a later query can move an earlier one's set); on an
    instance, ``couples_queries()``, False where its configuration keeps the diagonal alone or
    every tile (a plain bool, as the contract reads it, at both levels)."""

    def __get__(self, method, cls=None) -> bool:
        return True if method is None else method.couples_queries()


class TileSparse(AttentionMethod):
    """The block-sparse family (module docstring): a subclass gives ``params`` (with
    ``BLOCK_PARAM``) and ``choose``; this class runs the kernel and does the accounting."""

    causal_query_coupled = _QueryCoupled()  # type: ignore[assignment]
    supports_causal = True  # native: the diagonal tile masked element-wise, any offset
    supports_grad = False  # the kernel's softmax runs in place
    phases = ("prefill",)
    phase_help = PREFILL_ONLY
    key_set_note = ""
    cost_help = (
        "the kept pairs, 2·(d + d_v) + 3 each (the diagonal's causal triangle counted), plus the "
        "pass that ranks the tiles."
    )

    # ---- what a subclass provides -----------------------------------------------------------
    def choose(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        scale: float,
        mask: Mask,
        generator: torch.Generator | None,
    ) -> KeyBlocks:
        """The key blocks of every query tile (module docstring); q, k in the working dtype."""
        raise NotImplementedError(f"{self.name} implements no choose")

    def model_tiles(self, layout: TileLayout) -> torch.Tensor | None:
        """(T_q,) key tiles expected kept per query tile, diagonal included (``keys_per_query``,
        ``flops``); None when only the call knows (a threshold rule)."""
        return None

    def couples_queries(self) -> bool:
        """Whether a later query can move an earlier query's set under this configuration."""
        return True

    def scoring_flops(self, b: int, h: int, n_q: int, n_k: int, d: int) -> float:
        """Operations of the pass that ranks the tiles."""
        return 0.0

    # ---- the forward -------------------------------------------------------------------------
    def layout(self, n_q: int, n_k: int, mask: Mask) -> TileLayout:
        return TileLayout.of(n_q, n_k, self.config["block"], mask)

    def blocks(self, q, k, scale, generator, mask) -> KeyBlocks:
        """``choose`` on the working dtype: the one choice the forward and the sets share."""
        work = working_dtype(q.dtype)
        return self.choose(q.to(work), k.to(work), scale, mask, generator)

    def forward_full(self, q, k, v, scale, generator):
        return attend_blocks(q, k, v, scale, FULL, self.blocks(q, k, scale, generator, FULL))

    def forward_causal(self, q, k, v, scale, generator, mask):
        return attend_blocks(q, k, v, scale, mask, self.blocks(q, k, scale, generator, mask))

    # ---- what the call read ------------------------------------------------------------------
    def _as_run(self, q, k, mask) -> tuple[torch.Tensor, Mask, TileLayout]:
        """The keys and mask the forward runs with (``runs_as``) and their layout."""
        n_q, n_k = q.shape[-2], k.shape[-2]
        mask.check(n_q, n_k)
        keys, effective = self.runs_as(n_q, n_k, mask)
        return k[..., :keys, :], effective, self.layout(n_q, keys, effective)

    def key_sets(self, q, k, v, scale, generator, mask=FULL):
        n_q, n_k = q.shape[-2], k.shape[-2]
        k_run, effective, layout = self._as_run(q, k, mask)
        blocks = self.blocks(q, k_run, scale, generator, effective)
        return KeySets.from_index(
            n_q, n_k, lambda start, stop: blocks.query_sets(layout, start, stop)
        )

    def realised_pairs(self, q, k, scale, generator, mask=FULL) -> tuple[torch.Tensor, int]:
        """((b, h) computed pairs, allowed pairs) of the call: counted from its own choice."""
        k_run, effective, layout = self._as_run(q, k, mask)
        blocks = self.blocks(q, k_run, scale, generator, effective)
        return blocks.pairs(layout), layout.allowed_pairs()

    def realised_keys_per_query(self, q, k, v, scale, generator, mask=FULL):
        pairs, _ = self.realised_pairs(q, k, scale, generator, mask)
        return float(pairs.double().mean()) / q.shape[-2]

    def realised_density(self, q, k, v, scale, generator=None, mask=FULL) -> float:
        """Computed pairs over allowed pairs, averaged over the slices: what the call read."""
        pairs, allowed = self.realised_pairs(q, k, scale, generator, mask)
        return float(pairs.double().mean()) / allowed

    # ---- the cost models ---------------------------------------------------------------------
    def model_pairs(self, n_q: int, n_k: int, mask: Mask) -> float:
        """Pairs computed per slice under ``model_tiles`` (NaN when not modelled)."""
        layout = self.layout(n_q, n_k, mask)
        kept = self.model_tiles(layout)
        if kept is None:
            return float("nan")
        sizes = layout.query_sizes()
        if layout.causal:  # the tiles before the diagonal are whole, the diagonal masked
            before = (kept - 1).clamp(min=0) * layout.block * sizes
            return float((before + layout.near_pairs()).sum())
        return float((torch.clamp(kept * layout.block, max=n_k) * sizes).sum())

    def keys_per_query(self, n_q, n_k, mask=FULL):
        return self.model_pairs(n_q, n_k, mask) / n_q

    def cost(self, b, h, n_q, n_k, d, d_v, mask):
        # causal: the kept pairs under the mask (about half the full call's at the same budget)
        keys, mask = self.runs_as(n_q, n_k, mask)
        pairs = self.model_pairs(n_q, keys, mask)
        if math.isnan(pairs):
            return self.flops(b, h, n_q, keys, d, d_v)
        return b * h * pairs * (2 * (d + d_v) + 3) + self.scoring_flops(b, h, n_q, keys, d)

    def flops(self, b, h, n_q, n_k, d, d_v):
        pairs = self.model_pairs(n_q, n_k, FULL)
        return b * h * pairs * (2 * (d + d_v) + 3) + self.scoring_flops(b, h, n_q, n_k, d)

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        # the padded queries, the keys and values on the key grid, the output, three chunk
        # buffers, and the slots (int64 and bool) of every tile
        layout = self.layout(n_q, n_k, FULL)
        kept = self.model_tiles(layout)
        slots = int(kept.max()) if kept is not None else layout.key_tiles
        grid = layout.key_tiles * layout.block
        rows = b * h * (layout.query_tiles * layout.block * (d + d_v) + grid * (d + d_v))
        # per slot its index and flag, the kernel's gathered row and its masks; per tile the
        # rows of its diagonal
        index = b * h * layout.query_tiles * (20 * slots + 8 * layout.block)
        return float(itemsize * (rows + 3 * CHUNK_ELEMENTS) + index)


COUNT_PARAMS = (
    Param("keys", int, 4096, "keys kept per query: ⌈keys/B⌉ key tiles per query tile, the "
          "diagonal included", 1, 2**24),
    Param("density", float, 0.0, "when > 0: keep this share of each query tile's allowed key "
          "tiles instead (`keys` is then unused)", 0.0, 1.0),
)  # fmt: skip


class TopTiles(TileSparse):
    """The count-driven tile rule: per query tile, its diagonal and the highest ``tile_scores``
    up to ⌈keys/B⌉ tiles (or ⌈density · allowed tiles⌉)."""

    params = (*COUNT_PARAMS, BLOCK_PARAM)

    @classmethod
    def params_for_budget(cls, budget):
        return {"keys": budget}

    @classmethod
    def exact_limit(cls, n_q, n_k):
        return {"keys": max(n_k, 1), "density": 1.0}  # every allowed tile is kept

    def couples_queries(self):
        # the diagonal alone (keys ≤ B) or every tile (density 1) reads the same keys whatever
        # the other queries of the tile
        density = self.config["density"]
        if density > 0:
            return density < 1
        return self.config["keys"] > self.config["block"]

    def tile_scores(self, q, k, scale, layout: TileLayout) -> torch.Tensor:
        """(b, h, T_q, T_k): higher is kept first."""
        raise NotImplementedError

    def model_tiles(self, layout):
        density = self.config["density"]
        allowed = layout.allowed_tiles()
        if density > 0:
            wanted = torch.ceil(density * allowed.double()).long()
        else:
            wanted = torch.full_like(allowed, math.ceil(self.config["keys"] / layout.block))
        low = layout.diagonal_mask().sum(-1)
        return torch.minimum(torch.maximum(wanted, low), allowed)

    def choose(self, q, k, scale, mask, generator):
        layout = self.layout(q.shape[-2], k.shape[-2], mask)
        return top_tiles(self.tile_scores(q, k, scale, layout), self.model_tiles(layout), layout)


__all__ = [
    "BLOCK",
    "BLOCK_PARAM",
    "COUNT_PARAMS",
    "KeyBlocks",
    "TileLayout",
    "TileSparse",
    "TopTiles",
    "attend_blocks",
    "diagonal_tiles",
    "top_tiles",
]
