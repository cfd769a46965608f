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

    def unsort_queries(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of ``sorted_queries``: (b, h, num_blocks, query_block, w) -> (b, h, n_q, w)."""
        b, h, w = y.shape[0], y.shape[1], y.shape[-1]
        return scatter_rows(y.reshape(b, h, -1, w)[:, :, : self.n_q], self.q_order, self.n_q)


def sort_into_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    num_projs: int,
    generator: torch.Generator | None,
) -> SortedBlocks:
    """Hash q and k with the same random directions, sort each, and lay out the blocks."""
    b, h, n_q, d = q.shape
    n_k = k.shape[-2]
    directions = random_directions(
        b, h, d, num_projs, dtype=q.dtype, device=q.device, generator=generator
    )
    # A stable sort keeps the original order inside one bucket, so results are reproducible.
    q_order = torch.sort(hamming_rank(q, directions), dim=-1, stable=True).indices
    k_order = torch.sort(hamming_rank(k, directions), dim=-1, stable=True).indices
    key_block = min(block_size, n_k)
    num_blocks = -(-n_k // key_block)
    query_block = -(-n_q // num_blocks)
    return SortedBlocks(q_order, k_order, num_blocks, query_block, key_block, n_q, n_k)
