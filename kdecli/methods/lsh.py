"""Angular LSH in Hamming (Gray-code) order and the sorted-block layout built on it.

Shared by ``kdeformer`` and ``hyperattention``.  With r random Gaussian directions w_1..w_r, the
code of x is Σ_t 2^t·[w_t·x > 0].  Sorting by the code's rank in the reflected Gray-code sequence
g(p) = p XOR (p >> 1) puts codes that differ in one bit next to each other, so similar vectors land
in the same block after sorting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdecli.methods.common import gather_rows, inverse_permutation, pad_dim, scatter_rows
from kdecli.methods.params import Param


def gray_rank_table(num_bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """table[c] = position of code c in the Gray-code sequence (the inverse of g(p) = p ^ (p >> 1))."""
    positions = torch.arange(2**num_bits, device=device)
    gray = positions ^ (positions >> 1)
    table = torch.empty_like(positions)
    table[gray] = positions
    return table


def random_directions(
    b: int,
    h: int,
    d: int,
    num_projs: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Independent Gaussian directions per batch×head slice: (b, h, d, r)."""
    w = torch.randn(b, h, d, num_projs, generator=generator, device=device, dtype=torch.float32)
    return w.to(dtype)


def hamming_rank(x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Gray-code rank of the angular LSH code of each row of x (b, h, n, d) -> (b, h, n) int64."""
    num_projs = directions.shape[-1]
    bits = (x @ directions.to(x.dtype)) > 0
    weights = 2 ** torch.arange(num_projs, device=x.device)
    codes = (bits.long() * weights).sum(-1)
    return gray_rank_table(num_projs, x.device)[codes]


@dataclass
class SortedBlocks:
    """Queries and keys sorted by LSH rank and cut into the same number of blocks.

    ``q_order``/``k_order`` (b, h, n) are the sorting permutations.  Sorted keys are padded to
    ``num_blocks·key_block`` and sorted queries to ``num_blocks·query_block``; padded keys sit at
    sorted positions >= n_k, padded queries at positions >= n_q.  The block of a sorted key at
    position p is p // key_block; of a sorted query at position p, p // query_block.  Blocks live
    inside one batch×head slice, so nothing ever crosses slices.
    """

    q_order: torch.Tensor
    k_order: torch.Tensor
    num_blocks: int
    query_block: int
    key_block: int
    n_q: int
    n_k: int

    def key_block_of(self, k_index: torch.Tensor) -> torch.Tensor:
        """Block id of original key indices (b, h, m) -> (b, h, m)."""
        return torch.gather(inverse_permutation(self.k_order), -1, k_index) // self.key_block

    # ---- layout helpers (hyperattention) ----------------------------------------------------
    def sorted_queries(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of x (b, h, n_q, w) in sorted order, zero-padded: (b, h, num_blocks, query_block, w)."""
        nb, bq = self.num_blocks, self.query_block
        return pad_dim(gather_rows(x, self.q_order), nb * bq).view(
            *x.shape[:2], nb, bq, x.shape[-1]
        )

    def sorted_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of x (b, h, n_k, w) in sorted order, zero-padded: (b, h, num_blocks, key_block, w)."""
        nb, bk = self.num_blocks, self.key_block
        return pad_dim(gather_rows(x, self.k_order), nb * bk).view(
            *x.shape[:2], nb, bk, x.shape[-1]
        )

    def key_valid(self, device: torch.device) -> torch.Tensor | None:
        """(num_blocks, key_block) mask of real (not padded) sorted keys; None when nothing is padded."""
        nb, bk = self.num_blocks, self.key_block
        if nb * bk == self.n_k:
            return None
        return torch.arange(nb * bk, device=device).view(nb, bk) < self.n_k

    def samples_in_block(self, k_index: torch.Tensor) -> torch.Tensor:
        """[block(key) == t] for key indices (b, h, m) and every block t: (b, h, num_blocks, m)."""
        blocks = torch.arange(self.num_blocks, device=k_index.device).view(1, 1, -1, 1)
        return self.key_block_of(k_index).unsqueeze(2) == blocks

    def block_key_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, valid), (b, h, num_blocks, key_block): the original keys each query block
        scores (``sorted_keys``' rows) and which are real (not padding)."""
        nb, bk = self.num_blocks, self.key_block
        position = torch.arange(nb * bk, device=self.k_order.device)
        index = self.k_order[..., position.clamp(max=self.n_k - 1)]
        valid = (position < self.n_k).expand_as(index)
        return index.unflatten(-1, (nb, bk)), valid.unflatten(-1, (nb, bk))

    def unsort_queries(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of ``sorted_queries``: (b, h, num_blocks, query_block, w) -> (b, h, n_q, w)."""
        b, h, w = y.shape[0], y.shape[1], y.shape[-1]
        return scatter_rows(y.reshape(b, h, -1, w)[:, :, : self.n_q], self.q_order, self.n_q)

    # ---- masks, in the shapes the estimators broadcast (shared with AlignedBlocks) ------------
    def block_mask(self, device: torch.device) -> torch.Tensor | None:
        """Keys of a query's block it must not score (padding), broadcastable to the block logits
        (b, h, num_blocks, query_block, key_block); None when there are none."""
        valid = self.key_valid(device)
        return None if valid is None else ~valid[:, None, :]

    def sample_mask(self, k_index: torch.Tensor) -> torch.Tensor:
        """Samples already scored in the query's block, broadcastable to the sample logits
        (b, h, num_blocks, query_block, m): built from block ids, (num_blocks × m) per slice."""
        return self.samples_in_block(k_index).unsqueeze(3)


@dataclass
class AlignedBlocks(SortedBlocks):
    """Aligned pairing (docs/methods.md): a block of sorted queries scores the ``key_block``
    consecutive sorted keys around the position of its queries' ranks among the sorted key ranks,
    not the key block of the same index.

    With p_i = the middle of the run of sorted keys that share query i's rank (its insertion
    point when none does), query block t (``query_block`` consecutive sorted queries, as with rank
    pairing) gets the window [s_t, s_t + B) with s_t = p_med − B/2 clamped into [0, n_k − B],
    p_med its median query's p.  Every query scores exactly B keys, as with rank pairing, and the
    products have the same shapes, so it costs the same; with K = Q the two nearly coincide.
    §12's finer variant (a window per query inside a 1.5·B tile window, tiles of half a block) was
    measured too: on MiniLM it lowered kdeformer's error by 11.2, 13.7 and 16.0 % at budgets 64,
    128, 256 against 11.1, 13.0 and 15.4 % for this one, and took 1.4–1.9× the time at n = 16,384,
    so this one is kept.
    """

    tile_start: torch.Tensor | None = None  # s_t: (b, h, num_blocks)

    def sorted_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Each query block's window of sorted keys: (b, h, num_blocks, key_block, w)."""
        b, h = x.shape[:2]
        positions = self.tile_start.unsqueeze(-1) + torch.arange(self.key_block, device=x.device)
        index = torch.gather(self.k_order, -1, positions.flatten(2))  # original key indices
        return gather_rows(x, index).view(b, h, self.num_blocks, self.key_block, x.shape[-1])

    def key_valid(self, device: torch.device) -> torch.Tensor | None:
        return None  # windows lie inside the n_k real keys

    def block_key_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        positions = self.tile_start.unsqueeze(-1) + torch.arange(
            self.key_block, device=self.k_order.device
        )
        index = torch.gather(self.k_order, -1, positions.flatten(2)).view(positions.shape)
        return index, torch.ones_like(index, dtype=torch.bool)

    def block_mask(self, device: torch.device) -> None:
        return None

    def sample_mask(self, k_index: torch.Tensor) -> torch.Tensor:
        """Samples inside the block's window: (b, h, num_blocks, 1, m), from positions."""
        position = torch.gather(inverse_permutation(self.k_order), -1, k_index)  # (b, h, m)
        offset = position.unsqueeze(2) - self.tile_start.unsqueeze(-1)  # (b, h, num_blocks, m)
        return ((offset >= 0) & (offset < self.key_block)).unsqueeze(3)


PAIRINGS = ("auto", "rank", "aligned")
PAIRING = Param(  # the parameter of both sorted-LSH methods
    "pairing",
    str,
    "auto",
    "which keys a query's block scores: rank (the t-th query block with the t-th key block, the "
    "released code), aligned (the keys whose LSH rank is nearest its own), or "
    "auto (rank when K = Q, else aligned)",
    choices=PAIRINGS,
)


def resolve_pairing(pairing: str, q: torch.Tensor, k: torch.Tensor) -> str:
    """``auto``: rank pairing when the keys are the queries (K = Q, as on GloVe, where it is the
    better one: at the paper's protocol aligned was 10–12 % worse at budgets 64–512), aligned
    otherwise (a model's heads: 11–15 % lower error on MiniLM at budgets 64–256).  Measured in
    benchmarks/bench_pairing.py."""
    if pairing != "auto":
        return pairing
    return "rank" if q.shape == k.shape and torch.equal(q, k) else "aligned"


def sort_into_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    num_projs: int,
    generator: torch.Generator | None,
    pairing: str = "rank",
) -> SortedBlocks:
    """Hash q and k with the same random directions, sort each, and lay out the blocks: the t-th
    query block with the t-th key block (``rank``), or each query with the keys nearest its own
    rank (``aligned``, ``AlignedBlocks``)."""
    b, h, n_q, d = q.shape
    n_k = k.shape[-2]
    directions = random_directions(
        b, h, d, num_projs, dtype=q.dtype, device=q.device, generator=generator
    )
    # A stable sort keeps the original order inside one bucket, so results are reproducible.
    q_rank, q_order = torch.sort(hamming_rank(q, directions), dim=-1, stable=True)
    k_rank, k_order = torch.sort(hamming_rank(k, directions), dim=-1, stable=True)
    key_block = min(block_size, n_k)
    num_blocks = -(-n_k // key_block)
    query_block = -(-n_q // num_blocks)
    if pairing == "rank":
        return SortedBlocks(q_order, k_order, num_blocks, query_block, key_block, n_q, n_k)
    return aligned_blocks(q_rank, q_order, k_rank, k_order, key_block, query_block, n_q, n_k)


def aligned_blocks(q_rank, q_order, k_rank, k_order, key_block, query_block, n_q, n_k):
    """The layout of ``AlignedBlocks`` from the sorted ranks (b, h, n) of queries and keys."""
    contiguous, ranks = k_rank.contiguous(), q_rank.contiguous()
    low = torch.searchsorted(contiguous, ranks, side="left")
    high = torch.searchsorted(contiguous, ranks, side="right")
    middle = (low + high) // 2  # (b, h, n_q), non-decreasing along the sorted queries
    num_blocks = -(-n_q // query_block)
    medians = torch.arange(num_blocks, device=q_rank.device) * query_block + query_block // 2
    p_med = middle[..., medians.clamp(max=n_q - 1)]  # (b, h, num_blocks)
    tile_start = (p_med - key_block // 2).clamp(0, n_k - key_block)
    return AlignedBlocks(q_order, k_order, num_blocks, query_block, key_block, n_q, n_k, tile_start)


def block_sets(blocks: SortedBlocks, shared: torch.Tensor | None = None):
    """(index, valid), (b, h, n_q, key_block [+ m]): the keys of each query's block and then the
    ``shared`` keys (b, h, m) every query also reads (a residual's samples): the key sets of
    the sorted-LSH estimators (``kdecli.methods.keysets``)."""
    index, valid = blocks.block_key_index()
    block = inverse_permutation(blocks.q_order) // blocks.query_block  # (b, h, n_q)
    at = block.unsqueeze(-1).expand(*block.shape, index.shape[-1])
    index, valid = torch.gather(index, 2, at), torch.gather(valid, 2, at)
    if shared is None:
        return index, valid
    shared = shared.unsqueeze(-2).expand(*block.shape, shared.shape[-1])
    return torch.cat([index, shared], -1), torch.cat(
        [valid, torch.ones_like(shared, dtype=torch.bool)], -1
    )
