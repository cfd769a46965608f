"""Where a query sits: attention masks as values, not flags.

``Full()``: every query sees every key.  ``Causal(offset)``: query i sits at key position
``offset + i`` and sees the keys j ≤ offset + i.  Prefill is ``Causal(0)`` with n_q = n_k; a decode
step of n_q queries over a cache of n_k keys is ``Causal(n_k - n_q)``, the queries being the *last*
n_q positions (bottom-right alignment, as in decoding and flash-attention ≥ 2.1).  PyTorch's SDPA
``is_causal=True`` aligns top-left when n_q ≠ n_k, so it is the reference only for ``Causal(0)``
with n_q = n_k.

A mask is valid for n_q × n_k inputs when every query sits among the keys: ``offset >= 0`` and
``offset + n_q <= n_k`` (keys after the last query's position are then seen by no query).
``Causal.bottom_right(n_q, n_k)`` is the decode alignment; ``mask_of(causal, offset, n_q, n_k)``
turns the command line's flag and offset into a mask.

This module is a leaf (it imports only torch): methods, the measuring kernel, experiments, the
Hugging Face adapters and the CLI all share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from kdecli.errors import UsageError


@dataclass(frozen=True)
class Full:
    """No mask: every query sees every key."""

    is_causal = False

    def problem(self, n_q: int, n_k: int) -> str | None:
        """Why n_q × n_k inputs cannot take this mask (None: they can; any shape can)."""
        return None

    def check(self, n_q: int, n_k: int) -> None:
        """Nothing to check: any shape is valid."""

    def key_span(self, n_q: int, n_k: int) -> int:
        """Keys seen by at least one query: all n_k."""
        return n_k

    def effective(self, n_q: int, n_k: int) -> Full:
        """The mask a call on n_q × n_k inputs runs under: itself."""
        return self

    def visible_keys(self, n_q: int, n_k: int) -> torch.Tensor:
        """Keys each query sees, (n_q,) int64: all n_k."""
        return torch.full((n_q,), n_k, dtype=torch.int64)

    def rows(self, start: int) -> Full:
        """The mask of the queries from ``start`` on (a query chunk): the same."""
        return self

    def allowed(self, n_q: int, n_k: int, device: torch.device | str | None = None):
        """The boolean (n_q, n_k) matrix of allowed pairs; None: every pair (no tensor built)."""
        return None

    def describe(self) -> str:
        return "full"

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True)
class Causal:
    """Query i sits at key position ``offset + i`` and sees keys j ≤ offset + i."""

    offset: int = 0
    is_causal = True

    def __post_init__(self) -> None:
        if isinstance(self.offset, bool) or not isinstance(self.offset, int) or self.offset < 0:
            raise UsageError(
                f"a causal mask's query offset must be an integer >= 0; got {self.offset!r}."
            )

    @classmethod
    def bottom_right(cls, n_q: int, n_k: int) -> Causal:
        """The decode alignment: the queries are the last n_q of n_k positions."""
        if n_q > n_k:
            raise UsageError(
                f"a causal mask needs at most as many queries as keys; got n_q = {n_q}, n_k = {n_k}."
            )
        return cls(n_k - n_q)

    def problem(self, n_q: int, n_k: int) -> str | None:
        """Why n_q × n_k inputs cannot take this mask: a query would sit past the last key."""
        if self.offset + n_q <= n_k:
            return None
        if n_q > n_k:
            return (
                f"a causal mask needs at most as many queries as keys; got n_q = {n_q}, n_k = {n_k}"
            )
        return (
            f"causal mask with query offset {self.offset}: the last of n_q = {n_q} queries "
            f"would sit at position {self.offset + n_q - 1}, past the n_k = {n_k} keys; the "
            f"offset must be at most n_k - n_q = {n_k - n_q}"
        )

    def check(self, n_q: int, n_k: int) -> None:
        """Refuse shapes whose queries do not all sit among the keys."""
        problem = self.problem(n_q, n_k)
        if problem is not None:
            raise UsageError(problem + ".")

    def key_span(self, n_q: int, n_k: int) -> int:
        """Keys seen by at least one query: those up to the last query's position, offset + n_q
        (at most n_k).  The keys after it are seen by no query; a call may drop them."""
        return min(n_k, self.offset + n_q)

    def effective(self, n_q: int, n_k: int) -> Mask:
        """The mask a call on n_q × n_k inputs runs under: ``FULL`` when every query sees every
        key (one query at the last position, a decode step: offset + 1 >= n_k), else itself.
        Dispatching that case as full attention keeps a decode step's numbers those of a plain
        call."""
        return FULL if self.offset + 1 >= n_k else self

    def visible_keys(self, n_q: int, n_k: int) -> torch.Tensor:
        """Keys each query sees, (n_q,) int64: offset + i + 1, at most n_k."""
        return (torch.arange(n_q, dtype=torch.int64) + self.offset + 1).clamp(max=n_k)

    def rows(self, start: int) -> Causal:
        """The mask of the queries from ``start`` on (a query chunk): they sit ``start`` later."""
        return Causal(self.offset + start)

    def allowed(self, n_q: int, n_k: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The boolean (n_q, n_k) matrix of allowed pairs: key j ≤ offset + i."""
        rows = torch.arange(n_q, device=device).unsqueeze(-1) + self.offset
        return torch.arange(n_k, device=device) <= rows

    def describe(self) -> str:
        return "causal" if self.offset == 0 else f"causal(offset={self.offset})"

    def __str__(self) -> str:
        return self.describe()


Mask = Union[Full, Causal]
FULL = Full()


def mask_of(causal: bool, offset: int | None, n_q: int, n_k: int) -> Mask:
    """The mask of a causal flag and an optional query offset on n_q × n_k inputs, checked.
    Causal without an offset is bottom-right aligned (``Causal(n_k - n_q)``, 0 for prefill)."""
    if not causal:
        if offset is not None:
            raise UsageError("--query-offset places queries under a causal mask; add --causal.")
        return FULL
    mask = Causal.bottom_right(n_q, n_k) if offset is None else Causal(offset)
    mask.check(n_q, n_k)
    return mask
