"""The tile oracle ``topk_tiles``: the ceiling of the block-sparse prefill methods.

Query tile t keeps its diagonal and the allowed key tiles of highest true attention mass,

    M_tr = Σ_{i∈t} Σ_{j∈r, j allowed for i} P_ij,   P = D⁻¹A the exact softmax (under the mask),

as many as ``blocktopk`` keeps at the same budget (⌈keys/B⌉ tiles, or ⌈density · allowed
tiles⌉), then attends exactly to them (``kdecli.methods.tiles``).  No rule choosing the same number
of tiles of the same size keeps more of the query tile's attention mass, so its error is what the
tile granularity alone costs at that density, and the gap from a method to it is what the
method's scoring costs.  Mass is not error: on heads without structure a method's tiles can
come out slightly better on the output error at the same density; on heads with heavy tiles the
oracle's are the better ones (tests/test_blocksparse.py).  Causal: a tile's mass sums all its rows,
so the choice for a query reads the keys up to the end of its tile, never past it.  It reads every
logit to rank the tiles: analysis only, like ``topk``, refusing inputs above ``max_n``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdecli.masks import FULL
from kdecli.measure.reference import DEFAULT_MEMORY_BYTES, iter_softmax_chunks
from kdecli.methods.base import Param
from kdecli.methods.oracles import _too_large
from kdecli.methods.registry import register
from kdecli.methods.tiles import BLOCK, BLOCK_PARAM, COUNT_PARAMS, TileLayout, TopTiles


@register
class TopKTiles(TopTiles):
    name = "topk_tiles"
    summary = "Oracle: each query tile keeps the key tiles of highest true attention mass."
    paper = "oracle (the ceiling of block-sparse methods: the best tiles of the same count)"
    budget_help = (
        f"m = keys kept per query (`keys`): ⌈m/B⌉ key tiles of B = {BLOCK} per query tile, its "
        "diagonal included, as `blocktopk` (the same under `--budget-mode keys`)."
    )
    params = (
        *COUNT_PARAMS,
        BLOCK_PARAM,
        Param("max_n", int, 131072, "refuse inputs with n_q or n_k above this", 1, 2**24),
    )
    role = "oracle"
    cost_help = (
        "like exact attention (every probability, to rank the tiles: 2·n_q·n_k·d plus the "
        "softmax) plus the kept pairs."
    )

    def input_reasons(self, n_q, n_k, d, d_v, mask):
        why = "it reads all n_q·n_k probabilities to rank the tiles"
        return _too_large(self.name, n_q, n_k, self.config["max_n"], why)

    def tile_scores(self, q, k, scale, layout):
        return tile_mass(q, k, scale, layout)

    def scoring_flops(self, b, h, n_q, n_k, d):
        return float(b * h * n_q * n_k * (2 * d + 4))

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        # the kernel's, plus the scoring: a chunk of float64 logits turned into probabilities,
        # its padded copy and the float64 inputs (``iter_softmax_chunks``), and the tile masses
        layout = self.layout(n_q, n_k, FULL)
        inputs = 8 * b * h * (n_q + n_k) * d
        mass = 8 * b * h * layout.query_tiles * layout.key_tiles
        scoring = 3 * DEFAULT_MEMORY_BYTES + inputs + mass
        return super().memory_bytes(b, h, n_q, n_k, d, d_v, itemsize) + float(scoring)


def tile_mass(q: torch.Tensor, k: torch.Tensor, scale: float, layout: TileLayout) -> torch.Tensor:
    """(b, h, T_q, T_k) float64: M_tr of the module docstring, from the exact probabilities in
    query chunks (never the whole n_q × n_k matrix)."""
    b, h, n_q, _ = q.shape
    block = layout.block
    mass = torch.zeros(b, h, layout.query_tiles, layout.key_tiles, dtype=torch.float64,
                       device=q.device)  # fmt: skip
    pad = layout.key_tiles * block - k.shape[-2]
    for start, stop, probs in iter_softmax_chunks(q, k, scale, mask=layout.mask()):
        per_tile = F.pad(probs, (0, pad)).unflatten(-1, (-1, block)).sum(-1)  # (b, h, c, T_k)
        tiles = layout.tile_of(torch.arange(start, stop, device=q.device))
        mass.index_add_(-2, tiles, per_tile)
    return mass
