"""Which keys each query read: the instrumented key sets behind the diagnostics.

A method that reads a key set S_i per query (a KV-cache selection, a block-sparse tile set, LSH
buckets, sampled keys, the oracles' top keys) returns its sets from ``key_sets(q, k, v, scale,
generator, mask)``, computed by the same code and the same generator draws as its forward, so that
they are the sets it used and not a model of them.  The sets are handed out by query chunks, so
that no n_q × n_k mask is held whole:

    sets.rows(start, stop) -> bool (b, h, stop − start, n_k): True where query start + i read key j

Each set lies inside what the mask allows (a key after a query's position is never in it), and
holds every key the method's estimate of that query touched.  ``exact_over_set``: the method's
output is exact softmax attention over S_i, renormalised,

    Õ_i = Σ_{j∈S_i} e^{ℓ_ij} v_j / Σ_{j∈S_i} e^{ℓ_ij},

so that its estimation error is 0 by construction and its row sum is the set's, Σ_{j∈S_i} e^{ℓ_ij}
(``kdecli.measure.diagnostics`` then computes its ``lse_error`` from the sets).  A method that
estimates over its set (samples, a kernel on the rest) sets it False.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeySets:
    """The key sets of one call: ``rows(start, stop)`` (module docstring), ``n_q`` queries over
    ``n_k`` keys, and whether the output is exact softmax over each set (``exact_over_set``)."""

    n_q: int
    n_k: int
    rows: Callable[[int, int], torch.Tensor]
    exact_over_set: bool = True

    @classmethod
    def from_dense(cls, read: torch.Tensor, exact_over_set: bool = True) -> KeySets:
        """Sets from a whole bool matrix (b, h, n_q, n_k) (small inputs, tests)."""
        n_q, n_k = read.shape[-2:]
        return cls(n_q, n_k, lambda start, stop: read[..., start:stop, :], exact_over_set)

    @classmethod
    def from_index(
        cls,
        n_q: int,
        n_k: int,
        chunk: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
        exact_over_set: bool = True,
    ) -> KeySets:
        """Sets from index slots: ``chunk(start, stop)`` gives ``(index, valid)``, each
        (b, h, stop − start, m): the key positions of m slots per query and which slots hold a
        key read (``kdecli.methods.selection.Selection``).  A position in two valid slots is
        one key of the set."""

        def rows(start: int, stop: int) -> torch.Tensor:
            index, valid = chunk(start, stop)
            return _scatter(index, valid, n_k)

        return cls(n_q, n_k, rows, exact_over_set)


def _scatter(index: torch.Tensor, valid: torch.Tensor, n_k: int) -> torch.Tensor:
    """(…, n_k) bool, True at every valid slot's position (an invalid slot marks nothing)."""
    # an invalid slot writes to a spare column n_k, cut off after the scatter
    spare = torch.zeros(*index.shape[:-1], n_k + 1, dtype=torch.bool, device=index.device)
    target = torch.where(valid, index.clamp(0, n_k - 1), torch.full_like(index, n_k))
    spare.scatter_(-1, target, True)
    return spare[..., :n_k]
