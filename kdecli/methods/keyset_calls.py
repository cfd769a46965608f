"""The diagnostics' hooks as a call runs them: key sets and row sums through the forward's dispatch.

``key_sets`` and ``log_row_sums`` (``kdecli.methods.base``) answer for the call
``method(q, k, v, scale=, generator=, mask=)``, so they follow its dispatch: the keys after the
last query's position are dropped, a causal mask under which every query sees every key runs as
``FULL``, and the rest goes to the method's full, native causal or decomposed path.  ``Call`` is
that dispatch applied once; the sets a method computes on the keys the call kept are widened back
to the caller's n_k (a dropped key is read by no query).

A method under the causal decomposition (``kdecli.methods.causal``) reads, for query i, every
allowed key of its exact leaves and, in each full block holding i, the keys the method read in
that block; its row sum is the merge of its pieces' (``decomposed_log_row_sums``).  Its sets come
from ``decomposed_key_sets``, which runs the same recursion with the same generator, the method's
``block_sets`` in place of its ``partial`` on each full block (the same draws, in the same order),
and carries each row's position through the recursion to place the block's sets.

The sets are handed out by query chunks (``kdecli.methods.keysets``); a method whose forward runs
its queries in chunks hands them out in *its own* chunks (``in_forward_chunks``), so that each
set comes from the same products, the same top-m and the same ties as the output did, whatever
chunks the diagnostics ask for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from kdecli.masks import Mask
from kdecli.methods.causal import Partial, causal_with_offset, decomposed_partial
from kdecli.methods.common import working_dtype
from kdecli.methods.keysets import KeySets


class Call(NamedTuple):
    """One call as the forward runs it: the keys and values it keeps, the ``mask`` it runs
    under, and the caller's key count ``n_k`` (the sets' width)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Mask
    n_k: int

    @classmethod
    def of(cls, method, q, k, v, mask: Mask) -> Call:
        """``AttentionMethod.forward``'s dispatch: the mask checked, the unseen keys dropped."""
        n_q, n_k = q.shape[-2], k.shape[-2]
        mask.check(n_q, n_k)
        keys, effective = method.runs_as(n_q, n_k, mask)
        return cls(q, k[..., :keys, :], v[..., :keys, :], effective, n_k)

    def widened(self, sets: KeySets) -> KeySets:
        """``sets`` over the call's kept keys as sets over the caller's n_k keys."""
        missing = self.n_k - sets.n_k
        if missing <= 0:
            return sets

        def rows(start: int, stop: int) -> torch.Tensor:
            kept = sets.rows(start, stop)
            return torch.nn.functional.pad(kept, (0, missing), value=False)

        return KeySets(sets.n_q, self.n_k, rows, sets.exact_over_set)


def in_forward_chunks(
    n_q: int, step: int, chunk: Callable[[int, int], torch.Tensor]
) -> Callable[[int, int], torch.Tensor]:
    """``rows(start, stop)`` from ``chunk(a, b)``, which computes the sets of the forward's own
    query chunks [a, b) = [t·step, min(n_q, (t + 1)·step)): the chunks covering [start, stop)
    are computed (the last one kept for the next request, since the diagnostics walk the
    queries in order) and cut to the rows asked for."""
    held: dict[int, torch.Tensor] = {}

    def piece(first: int) -> torch.Tensor:
        if first not in held:
            held.clear()
            held[first] = chunk(first, min(n_q, first + step))
        return held[first]

    def rows(start: int, stop: int) -> torch.Tensor:
        parts = []
        first = (start // step) * step
        while first < stop:
            block = piece(first)
            parts.append(block[..., max(start, first) - first : min(stop, first + step) - first, :])
            first += step
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    return rows


def index_rows(n_k: int, chunk: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]):
    """``chunk(start, stop) -> (index, valid)`` slots (``KeySets.from_index``) as bool rows."""
    return KeySets.from_index(1, n_k, chunk).rows


def decomposed_log_row_sums(
    method, q, k, v, scale: float, generator, mask: Mask, cast_full: bool = True
) -> torch.Tensor:
    """(b, h, n_q) log D̃_i of a decomposition method: its ``partial``'s estimate on ``FULL``;
    under a causal mask the merged lse of the pieces, the forward's own recursion.
    ``cast_full``: the method's ``forward_full`` runs in the working dtype (False: on the
    inputs' own, so that a half-precision call hashes as its forward did)."""
    call = Call.of(method, q, k, v, mask)
    work = working_dtype(q.dtype)
    q_w, k_w, v_w = q.to(work), call.k.to(work), call.v.to(work)
    if not call.mask.is_causal:
        if not cast_full:
            q_w, k_w, v_w = q, call.k, call.v
        return method.partial(q_w, k_w, v_w, scale, generator, None).lse
    return decomposed_partial(method, q_w, k_w, v_w, scale, generator, call.mask.offset).lse


# block_sets(q, k, v, scale, generator, query_offset) -> (index, valid), each (b, h, n_q, m): the
# keys the method reads in one non-causal call (a full block), drawing what its ``partial`` draws.


def decomposed_key_sets(
    method,
    q,
    k,
    v,
    scale: float,
    generator,
    mask: Mask,
    exact_over_set: bool,
    cast_full: bool = True,
) -> KeySets:
    """The key sets of a decomposition method's call: ``block_sets`` of the whole call on
    ``FULL``; under a causal mask, each query's keys over every piece of the recursion.
    ``cast_full`` as for ``decomposed_log_row_sums``."""
    call = Call.of(method, q, k, v, mask)
    work = working_dtype(q.dtype)
    q_w, k_w, v_w = q.to(work), call.k.to(work), call.v.to(work)
    n_q, n_k = q.shape[-2], k_w.shape[-2]
    if not call.mask.is_causal:
        if not cast_full:
            q_w, k_w, v_w = q, call.k, call.v
        index, valid = method.block_sets(q_w, k_w, v_w, scale, generator, None)
        sets = KeySets.from_index(
            n_q, n_k, lambda a, b: (index[..., a:b, :], valid[..., a:b, :]), exact_over_set
        )
        return call.widened(sets)
    b, h = q.shape[:2]
    width = b * h * n_k  # codes are query-major, ((i·b + β)·h + η)·n_k + j: sorted, by query
    small = torch.int32 if n_q * width < 2**31 else torch.int64  # half the memory when it fits
    codes = _recorded_pairs(method, q_w, k_w, v_w, scale, generator, call.mask.offset, small)
    codes = codes.sort().values
    query = codes // width

    def rows(start: int, stop: int) -> torch.Tensor:
        bounds = torch.tensor([start, stop], dtype=small, device=query.device)
        lo, hi = (int(x) for x in torch.searchsorted(query, bounds))
        read = torch.zeros(stop - start, width, dtype=torch.bool, device=q.device)
        read.view(-1)[codes[lo:hi].long() - start * width] = True
        return read.view(stop - start, b, h, n_k).permute(1, 2, 0, 3)

    return call.widened(KeySets(n_q, n_k, rows, exact_over_set))


def _recorded_pairs(method, q, k, v, scale, generator, offset, dtype) -> torch.Tensor:
    """Every (query, key) pair the causal call reads, as codes ((i·b + β)·h + η)·n_k + j in
    ``dtype``: the forward's recursion run with each row's position + 1 appended to q and v (0
    marks a padding row), recording the exact pieces' allowed pairs and each full block's
    sets."""
    b, h, n_q, _ = q.shape
    n_k = k.shape[-2]
    position = torch.arange(n_k, dtype=q.dtype, device=q.device) + 1
    q_at = torch.cat([q, position[offset:].view(1, 1, -1, 1).expand(b, h, -1, 1)], dim=-1)
    v_at = torch.cat([v, position.view(1, 1, -1, 1).expand(b, h, -1, 1)], dim=-1)
    pairs: list[torch.Tensor] = []

    def record(q_pos, k_pos, read):
        """read (b, H, c, s) over a piece's rows; q_pos (H, c), k_pos (H, s): positions + 1."""
        heads = read.shape[1]
        head = torch.arange(heads, device=q.device) // (heads // h)  # stacked halves -> head
        real = read & (q_pos > 0).unsqueeze(-1)
        beta, stacked, row, col = real.nonzero(as_tuple=True)
        i = q_pos[stacked, row].long() - 1 - offset
        j = k_pos[stacked, col].long() - 1
        pairs.append((((i * b + beta) * h + head[stacked]) * n_k + j).to(dtype))

    def dummy(x_q, x_v):
        return Partial(x_q.new_zeros(x_q.shape[:-1]), x_q.new_zeros(*x_q.shape[:-1], x_v.shape[-1]))

    def full_block(qb, kb, vb, query_offset):
        index, valid = method.block_sets(
            qb[..., :-1], kb, vb[..., :-1], scale, generator, query_offset
        )
        read = index_rows(kb.shape[-2], lambda start, stop: (index, valid))(0, qb.shape[-2])
        record(qb[0, ..., -1], vb[0, ..., -1], read)
        return dummy(qb, vb)

    def exact(qb, kb, vb, piece_mask):
        q_pos, k_pos = qb[0, ..., -1], vb[0, ..., -1]
        allowed = piece_mask.allowed(qb.shape[-2], kb.shape[-2], device=q.device)
        read = allowed & (k_pos > 0).unsqueeze(-2)  # (H, c, s)
        record(q_pos, k_pos, read.expand(b, *read.shape))
        return dummy(qb, vb)

    causal_with_offset(full_block, q_at, k, v_at, scale, method.causal_leaf(), offset, exact)
    return torch.cat(pairs)
