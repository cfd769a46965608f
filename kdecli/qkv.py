"""``QKV``: one attention input in the (batch, heads, n, d) layout, and where it came from."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from kdecli.errors import UsageError
from kdecli.masks import Mask, mask_of


@dataclass
class QKV:
    """Queries (b, h, n_q, d), keys (b, h, n_k, d), values (b, h, n_k, d_v) and where they came from.

    ``source`` is the input's name as reports and plot titles print it (``glove:6B.50d``,
    ``sample:glove``, ``data/acts.h5:/layer3``); ``default_scale`` is the softmax temperature the
    input carries, if any, and ``default_causal`` whether it is causal (a capture of a decoder
    layer); ``layer`` is the model layer it was captured from; ``notes`` holds what a source wants
    to record beside the name.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    source: str
    layout: str = "bhnd"
    default_scale: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    default_causal: bool | None = None
    layer: int | None = None

    @property
    def shape(self) -> dict[str, int]:
        b, h, n_q, d = self.q.shape
        return {
            "b": b,
            "h": h,
            "n_q": n_q,
            "n_k": self.k.shape[-2],
            "d": d,
            "d_v": self.v.shape[-1],
        }

    @functools.cached_property
    def digest(self) -> str:
        """The input's identity for job keys (``kdecli.sweeps.grid``): a digest of Q, K and V's shapes,
        dtypes and bytes — not of its name, which is a path that differs between machines.
        Computed once (the tensors are not expected to change in place)."""
        from kdecli.sweeps.grid import tensor_digest

        return tensor_digest(self.q, self.k, self.v)

    def scale(self, override: float | None = None) -> float:
        """The softmax temperature: an explicit value, else the input's own, else 1/√d."""
        if override is not None:
            return float(override)
        if self.default_scale is not None:
            return self.default_scale
        return 1.0 / math.sqrt(self.q.shape[-1])

    def causal(self, override: bool | None = None) -> bool:
        """Causal masking: an explicit choice, else the input's own, else not causal."""
        if override is not None:
            return bool(override)
        return bool(self.default_causal)

    def mask(self, causal: bool | None = None, offset: int | None = None) -> Mask:
        """The mask of this input (``kdecli.masks``): causal as ``causal`` says (None: the input's
        own flag, ``self.causal``), its queries at ``offset`` (None: the last n_q of the n_k
        positions, prefill when n_q = n_k).  A ``UsageError`` for an offset without causal
        masking or one that puts a query past the last key."""
        shape = self.shape
        return mask_of(self.causal(causal), offset, shape["n_q"], shape["n_k"])

    def last_queries(self, m: int) -> QKV:
        """The decode view of this input: its last ``m`` queries (Q's last m rows of each
        batch×head slice), K and V whole.  Under ``Causal(n_k − m)`` each of them sits at its own
        position and sees its own prefix, as the last m steps of decoding would; the rows' outputs
        are those rows of the prefill output (``kdecli.masks``).  Q is a view, not a copy."""
        n_q = self.q.shape[-2]
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n_q:
            raise UsageError(f"--queries must be in 1..{n_q} (the input's n_q); got {m!r}.")
        return replace(self, q=self.q[..., n_q - m :, :], notes=dict(self.notes))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> QKV:
        dtype = dtype or self.q.dtype
        moved = (t.to(device, dtype) for t in (self.q, self.k, self.v))
        return replace(self, **dict(zip("qkv", moved)), notes=dict(self.notes))
