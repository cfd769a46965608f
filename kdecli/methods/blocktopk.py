"""blocktopk: key tiles ranked by pooled scores (the parameter-free gate of MoBA, Lu et al., 2025,
and the first stage of SpargeAttn, Zhang et al., ICML 2025).

Each query tile t and key tile r are summarised by their means, q̄_t = mean_{i∈t} q_i and
k̄_r = mean_{j∈r} k_j (a ragged tile averages the members it has), and the tile's score is

    s_tr = scale · q̄_t · k̄_r,

one T_q × T_k product instead of n_q × n_k.  Query tile t keeps its diagonal and the allowed
key tiles of highest s_tr up to ⌈keys/B⌉ tiles (or ⌈density · allowed tiles⌉), then attends
exactly to them (``kdecli.methods.tiles``).  The pooled score is the logit of the mean query with
the mean key; a tile with one strong key among weak ones can rank low, which is what its ceiling,
``topk_tiles`` (the same count by true attention mass), measures.  Exact when every tile is kept.

Causal: the ranked tiles lie before the diagonal, kept whatever its score, so no later key moves
a query's keys; the pooled query is every query of the tile, so a later query of the same tile
can (``causal_query_coupled``, as in a deployed prefill, unless only the diagonal is kept).
"""

from __future__ import annotations

import torch

from kdecli.masks import FULL
from kdecli.methods.registry import register
from kdecli.methods.tiles import BLOCK, TopTiles


@register
class BlockTopK(TopTiles):
    name = "blocktopk"
    summary = "Block top-k: key tiles ranked by mean query · mean key, the diagonal always kept."
    paper = "Lu et al., 2025 (MoBA); Zhang et al., ICML 2025 (SpargeAttn, first stage)"
    budget_help = (
        f"m = keys kept per query (`keys`): ⌈m/B⌉ key tiles of B = {BLOCK} per query tile, its "
        "diagonal included (the same under `--budget-mode keys`); `density` keeps a share of "
        "the allowed tiles instead."
    )

    def tile_scores(self, q, k, scale, layout):
        keys = pooled(k, layout.block)
        return scale * layout.pooled_queries(q) @ keys.transpose(-1, -2)

    def scoring_flops(self, b, h, n_q, n_k, d):
        # the pooling (a pass over q and k) and the T_q × T_k product of the means
        layout = self.layout(n_q, n_k, FULL)
        tiles = layout.query_tiles * layout.key_tiles
        return float(b * h * ((n_q + n_k) * d + 2 * tiles * d))


def pooled(x: torch.Tensor, block: int) -> torch.Tensor:
    """(b, h, ⌈n/block⌉, d): the mean of each tile of ``block`` consecutive rows (the key
    tiles; the query tiles are ``TileLayout.pooled_queries``)."""
    n = x.shape[-2]
    pad = (-n) % block
    sums = torch.nn.functional.pad(x, (0, 0, 0, pad)).unflatten(-2, (-1, block)).sum(-2)
    sizes = (n - torch.arange(sums.shape[-2], device=x.device) * block).clamp(max=block)
    return sums / sizes.to(x.dtype).unsqueeze(-1)
