"""flexprefill (Lai et al., ICLR 2025, FlexPrefill): a pattern per head, then tiles up to a mass γ.

FlexPrefill decides per head, from the last query tile Q̂ (its B = ``block`` last queries), which
of two sparse patterns to trust.  The true attention of Q̂, summed per key tile,

    â_s = mean_{i∈Q̂} Σ_{j∈s} P_ij,    P = softmax(scale·Q̂Kᵀ) (under the mask),

is compared with the pooled estimate ā = softmax_s(scale · q̄ · k̄_s) (q̄ the mean of Q̂, k̄_s
the mean key of tile s) by the square root of their Jensen–Shannon divergence,

    D = √JS(ā ‖ â),   JS(p ‖ q) = ½ KL(p ‖ m) + ½ KL(q ‖ m),   m = (p + q)/2   (natural log).

* D < τ (``tau``, default 0.1): the pooled scores can be trusted, and the head is *query-aware*:
  every query tile t scores the key tiles by P̄_ts = softmax_s(scale · q̄_t · k̄_s) over its
  allowed tiles, and the head keeps the tiles of highest P̄ over all query tiles together until
  they hold a share γ (``gamma``, default 0.9) of Σ_ts P̄_ts, as in the authors' code.
* D ≥ τ: the head follows *vertical-slash* (``vertical_slash``'s lines, ranked from Q̂'s
  attention): the fewest columns whose mean attention c_j = mean_i P_ij reaches γ, and the
  fewest slash lines whose mass reaches γ, each line read as a block of B keys per query tile.

Every query tile keeps its diagonal, and a floor of ``min_budget`` keys' worth: ⌈min_budget/B⌉
tiles of highest P̄ (query-aware; fewer only where fewer are allowed), or min_budget columns and
⌈min_budget/B⌉ lines (vertical-slash, as the authors' code bounds each family: a column after a
query is no key of its); the budget caps them the same way (``keys``: ⌈keys/B⌉
tiles, or ``keys`` columns and ⌈keys/B⌉ lines).  Threshold-driven like ``xattention``: the keys
column reports what the call read.  The choice reads the last queries and every key, as in a
deployed prefill: a later key can move the tiles an earlier query reads (never a later key or
value into its output).  Exact when γ = 1 and the cap keeps everything.
"""

from __future__ import annotations

import math

import torch

from kdecli.masks import FULL
from kdecli.methods.base import Param
from kdecli.methods.blocktopk import pooled
from kdecli.methods.registry import register
from kdecli.methods.tiles import BLOCK, BLOCK_PARAM, KeyBlocks, TileLayout
from kdecli.methods.vertical_slash import (
    Lines,
    PerSlice,
    last_query_attention,
    line_scores,
    lines_as_blocks,
)
from kdecli.methods.xattention import CAP_PARAM, capped_tiles, tiles_from_mask


def tile_sums(x: torch.Tensor, block: int) -> torch.Tensor:
    """(…, ⌈n/block⌉): ``x`` (…, n) summed over each tile of ``block`` positions."""
    pad = (-x.shape[-1]) % block
    return torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (-1, block)).sum(-1)


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """√JS(p ‖ q) over the last axis (natural log; 0·log 0 = 0), in [0, √log 2]."""
    m = (p + q) / 2
    kl_p = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_q = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return (0.5 * (kl_p + kl_q)).clamp(min=0).sqrt()


def pattern_distance(
    probs: torch.Tensor, q_last: torch.Tensor, k: torch.Tensor, scale: float, block: int
) -> torch.Tensor:
    """(b, h) D = √JS(ā ‖ â) of the module docstring: ``probs`` (b, h, L, n_k) the last queries'
    attention, ``q_last`` those queries."""
    true = tile_sums(probs.mean(-2), block)
    estimate = torch.softmax(
        scale * (q_last.mean(-2, keepdim=True) @ pooled(k, block).transpose(-1, -2)), dim=-1
    ).squeeze(-2)
    return js_distance(estimate, true)


def fewest_reaching(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """(…) the fewest entries of highest score whose sum reaches ``gamma`` of the total
    (γ ≥ 1: all of them, whatever the rounding)."""
    if gamma >= 1:
        return torch.full(scores.shape[:-1], scores.shape[-1], device=scores.device)
    return fewest_reaching_sorted(torch.sort(scores, dim=-1, descending=True).values, gamma)


def fewest_reaching_sorted(ordered: torch.Tensor, gamma: float) -> torch.Tensor:
    """``fewest_reaching`` of scores already sorted in descending order (γ < 1)."""
    before = ordered.cumsum(-1) - ordered
    total = ordered.sum(-1, keepdim=True)
    return (before < gamma * total).sum(-1)


def query_aware_tiles(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    layout: TileLayout,
    gamma: float,
    least: int,
    most: int,
) -> torch.Tensor:
    """(b, h, T_q, T_k) bool: the tiles of highest pooled probability P̄ over the whole head
    until a share ``gamma`` of its mass, then per query tile at least ``least`` and at most
    ``most`` tiles (its top ones by P̄), the diagonal always."""
    device = q.device
    allowed = layout.allowed_mask().to(device)
    diagonal = layout.diagonal_mask().to(device)
    logits = scale * layout.pooled_queries(q) @ pooled(k, layout.block).transpose(-1, -2)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    flat = probs.flatten(-2)
    # (b, h): over every query tile of the head; one sort gives the count and the order
    ordered, order = torch.sort(flat, dim=-1, descending=True)
    if gamma >= 1:
        count = fewest_reaching(flat, gamma)
    else:
        count = fewest_reaching_sorted(ordered, gamma)
    chosen = torch.arange(flat.shape[-1], device=device) < count.unsqueeze(-1)
    keep = torch.zeros_like(chosen).scatter_(-1, order, chosen).view_as(probs)
    # per query tile: its own ranking, the diagonal first, between the floor and the cap (only
    # the top ``cap`` are ranked: a partial selection, not a sort of every row)
    ranked = probs.masked_fill(~allowed, float("-inf")).masked_fill(diagonal, float("inf"))
    cap = min(max(most, int(diagonal.sum(-1).max())), layout.key_tiles)
    top = torch.topk(ranked, cap, dim=-1).indices  # in descending order
    in_cap = torch.zeros_like(keep).scatter_(-1, top, True)
    in_floor = torch.zeros_like(keep).scatter_(-1, top[..., : min(least, cap)], True)
    keep = (keep | in_floor | diagonal) & in_cap & allowed
    return keep


def gamma_lines(
    probs: torch.Tensor,
    gamma: float,
    least: tuple[int, int],
    most: tuple[int, int],
    last: int,
    causal: bool,
) -> Lines:
    """The fewest columns and slash lines whose mass (``vertical_slash.line_scores`` of the last
    queries' attention ``probs``) reaches ``gamma``, each count per head clipped to [``least``,
    ``most``] (columns, lines)."""
    vertical, slash = line_scores(probs)
    if causal:  # lines above the main diagonal hold nothing
        slash = slash[..., : last + 1]
    n_columns = fewest_reaching(vertical, gamma).clamp(least[0], most[0])
    n_lines = fewest_reaching(slash, gamma).clamp(least[1], most[1])
    columns = torch.topk(vertical, min(int(n_columns.max()), vertical.shape[-1]), dim=-1)
    lines = torch.topk(slash, min(int(n_lines.max()), slash.shape[-1]), dim=-1)
    column_rank = torch.arange(columns.indices.shape[-1], device=probs.device)
    line_rank = torch.arange(lines.indices.shape[-1], device=probs.device)
    return Lines(
        columns.indices,
        column_rank < n_columns.unsqueeze(-1),
        last - lines.indices,
        line_rank < n_lines.unsqueeze(-1),
    )


def merge_heads(choose_first: torch.Tensor, first: KeyBlocks, second: KeyBlocks, n_k: int):
    """Per slice (b, h) ``first`` where ``choose_first``, else ``second``: both as single keys,
    padded to the same slots."""
    first, second = first.positions(n_k), second.positions(n_k)
    width = max(first.index.shape[-1], second.index.shape[-1])

    def padded(blocks: KeyBlocks) -> tuple[torch.Tensor, torch.Tensor]:
        missing = width - blocks.index.shape[-1]
        index = torch.nn.functional.pad(blocks.index, (0, missing))
        return index, torch.nn.functional.pad(blocks.valid, (0, missing))

    (index_a, valid_a), (index_b, valid_b) = padded(first), padded(second)
    pick = choose_first.view(*choose_first.shape, 1, 1)
    return KeyBlocks.from_positions(
        torch.where(pick, index_a, index_b), torch.where(pick, valid_a, valid_b), first.block
    )


@register
class FlexPrefill(PerSlice):
    name = "flexprefill"
    summary = (
        "FlexPrefill: per head, pooled-score tiles or vertical-slash by a Jensen–Shannon test, "
        "kept until a mass γ."
    )
    paper = "Lai, Lu, Zheng, Zheng, Zhou, ICLR 2025 (FlexPrefill)"
    budget_help = (
        f"m = the most keys a query may read (`keys`): ⌈m/B⌉ tiles of B = {BLOCK} per query "
        "tile, or m columns and ⌈m/B⌉ slash lines; `gamma` chooses below that cap and the keys "
        "column reports what the call read (the same under `--budget-mode keys`)."
    )
    params = (
        Param("gamma", float, 0.9, "share of the estimated attention mass kept (γ)", 0.0, 1.0),
        Param("tau", float, 0.1, "a head whose √JS distance is below τ is query-aware",
              0.0, 1.0),
        Param("min_budget", int, 1024, "floor of the kept keys' worth (the cap wins)",
              0, 2**24),
        CAP_PARAM,
        BLOCK_PARAM,
    )  # fmt: skip
    causal_query_coupled = True  # the pattern and the lines come from the last query tile
    causal_choice_reads_ahead = True  # ... over every key, later ones included
    cost_help = (
        "2·B·n_k·d for the last tile's attention, the pooled T_q × T_k scores, then the kept "
        "pairs, 2·(d + d_v) + 3 each."
    )

    @classmethod
    def params_for_budget(cls, budget):
        return {"keys": budget}

    @classmethod
    def exact_limit(cls, n_q, n_k):
        return {"gamma": 1.0, "keys": max(n_k, 1)}  # every tile, or every column

    def query_aware(self, q, k, scale, layout: TileLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """((b, h) bool: the heads whose pattern is query-aware, the last queries' attention
        (b, h, L, n_k))."""
        last_q = min(layout.block, layout.n_q, layout.n_k)
        q_last = q[..., -last_q:, :]
        last = int(layout.last_positions()[-1])
        probs = last_query_attention(q_last, k, scale, last, layout.causal)
        distance = pattern_distance(probs, q_last, k, scale, layout.block)
        return distance < self.config["tau"], probs

    def choose(self, q, k, scale, mask, generator):
        layout = self.layout(q.shape[-2], k.shape[-2], mask)
        block, gamma = layout.block, self.config["gamma"]
        cap = min(self.config["keys"], layout.n_k)
        least = min(self.config["min_budget"], cap)
        aware, probs = self.query_aware(q, k, scale, layout)
        parts = []
        if bool(aware.any()):
            keep = query_aware_tiles(
                q, k, scale, layout, gamma, math.ceil(least / block), math.ceil(cap / block)
            )
            parts.append(tiles_from_mask(keep, layout))
        if not bool(aware.all()):
            last = int(layout.last_positions()[-1])
            lines = gamma_lines(
                probs,
                gamma,
                (least, math.ceil(least / block)),
                (cap, math.ceil(cap / block)),
                last,
                layout.causal,
            )
            parts.append(lines_as_blocks(lines, layout))
        if len(parts) == 1:
            return parts[0]
        return merge_heads(aware, parts[0], parts[1], layout.n_k)

    def model_tiles(self, layout):
        return capped_tiles(self.config["keys"], layout)  # γ keeps fewer: the realised count

    def scoring_flops(self, b, h, n_q, n_k, d):
        layout = self.layout(n_q, n_k, FULL)
        tiles = layout.query_tiles * layout.key_tiles
        last_q = min(layout.block, n_q)
        return float(b * h * (last_q * n_k * (2 * d + 6) + (n_q + n_k) * d + tiles * (2 * d + 5)))

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        layout = self.layout(n_q, n_k, FULL)
        tiles = layout.query_tiles * layout.key_tiles
        last_q = min(layout.block, n_q)
        # the last tile's attention and its shifted copy; the pooled probabilities and sorts;
        # both patterns' slots as single keys when the heads split, and the kernel's gathered row
        # and masks for each
        scoring = itemsize * (2 * last_q * (n_k + last_q) + 3 * tiles) + 17 * tiles
        slots = 29 * layout.query_tiles * min(self.config["keys"] * 2 + layout.block, 2 * n_k)
        base = super().memory_bytes(b, h, n_q, n_k, d, d_v, itemsize)
        return base + float(b * h * (scoring + slots))
