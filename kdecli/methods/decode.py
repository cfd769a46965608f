"""A decode step split in two: the one-off preparation of a KV cache, and the per-step work.

Generation calls attention once per token: M queries (one, or a few with speculative decoding)
at the last M positions over a cache of n_k keys, ``Causal(n_k − M)`` (a decode step of one query
runs as ``FULL``).  Much of what an approximation computes from the keys does not change from one
step to the next: Performer's φ(K)ᵀṼ and Σ_j φ(k_j), hash codes and the order of the keys by
them, later the min/max of KV-cache pages or SnapKV's vote.  ``AttentionMethod.prepare_cache``
does that work once and returns a ``DecodeCache``; ``AttentionMethod.decode_step`` is what each
step pays.  Under the same seed the two compose to the method's ``forward``:

    decode_step(q, prepare_cache(k, v, mask=Causal(n_k − M), generator=g))
        == method(q, k, v, mask=Causal(n_k − M), generator=g)       (to float rounding)

because the preparation draws the random numbers the forward would draw first (directions,
rotations) from the same generator, and the step draws the rest.

A method that declares ``prepares_cache`` subclasses ``DecodeCache`` with its own typed fields;
the others keep the cache as it is and their step is their forward over it.

A method that chooses its cache from the prompt's attention (``h2o``, ``snapkv``) declares
``needs_prompt_queries``: its cache holds the prompt's queries, (b, h, n_k − M, d), the queries at
the positions [0, n_k − M) before the decode queries.  It has no forward of its own (a forward call
has no prompt), so it runs as ``decode_step(q, prepare_cache(k, v, ..., queries=prompt))`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch

from kdecli.errors import UsageError
from kdecli.masks import FULL, Causal, Mask

C = TypeVar("C", bound="DecodeCache")


@dataclass(frozen=True, eq=False)
class DecodeCache:
    """The cache a decode step reads: keys and values (b, h, n_k, ·), the mask the steps run
    under, the softmax scale, the generator of the method's random draws and, for a method that
    needs them, the prompt's queries (b, h, n_k − M, d; None otherwise).  A method's
    preparation adds its own fields in a subclass (``prepared`` builds one from a plain cache).
    A step does not modify the cache: it can be reused by any number of steps."""

    k: torch.Tensor
    v: torch.Tensor
    mask: Mask
    scale: float
    generator: torch.Generator | None = None
    queries: torch.Tensor | None = None

    @property
    def keys(self) -> int:
        return self.k.shape[-2]

    @property
    def prepared_work(self) -> bool:
        """Whether a preparation did work on this cache (a method's own subclass), or it only
        holds the keys and values (a method without one, or a mask its preparation skips)."""
        return type(self) is not DecodeCache

    @property
    def step_mask(self) -> Mask:
        """The mask a step runs under: ``FULL`` when every query sees every key (one query at the
        last position), else the causal mask itself."""
        if isinstance(self.mask, Causal) and self.mask.offset + 1 < self.keys:
            return self.mask
        return FULL

    def queries_fit(self, n_q: int) -> None:
        """A ``UsageError`` unless n_q queries are the ones this cache was prepared for: under a
        causal mask the last n_k − offset positions."""
        if isinstance(self.mask, Causal) and self.mask.offset + n_q != self.keys:
            raise UsageError(
                f"this cache was prepared for {self.keys - self.mask.offset} decode queries at "
                f"the last positions of {self.keys} keys ({self.mask}); got {n_q}."
            )

    @classmethod
    def prepared(cls: type[C], cache: DecodeCache, **extra: Any) -> C:
        """A ``cls`` holding what ``cache`` holds and the preparation's ``extra`` fields."""
        held = {f.name: getattr(cache, f.name) for f in fields(DecodeCache)}
        return cls(**held, **extra)


def decode_mask(n_k: int, queries: int = 1) -> Causal:
    """``Causal(n_k − queries)``: the mask of a decode step of ``queries`` queries at the last
    positions of a cache of n_k keys."""
    return Causal.bottom_right(queries, n_k)
