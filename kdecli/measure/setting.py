"""``Setting``: what one measurement is, resolved once per input — the one record of its identity.

A ``RunConfig`` says what was asked (``device="auto"``, ``dtype=None``, ``causal=None``); a
``Setting`` is what that means on one input: the device and working dtype resolved, the softmax
scale, the mask (``kdecli.masks``: ``Full`` or ``Causal(offset)``), the reference plan (every row,
or R seeded rows), and the options that change what a record measures (budget mode, ``bound``,
``timing``, ``backward``).  Record keys are derived from it (``key_fields``,
``kdecli.sweeps.grid.record_key``), the measuring loop reads it, and the report's header is
written from it, so the three cannot disagree.

Keys of settings that existed before masks were types hash the same content as then: the mask
enters as ``causal`` (a bool), and ``query_offset`` is added only when it is not 0, so a resume
file of an earlier version still resumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kdecli.devices import resolve_device, resolve_dtype
from kdecli.errors import UsageError
from kdecli.masks import Causal, Mask, mask_of
from kdecli.measure.row_reference import resolve_reference

if TYPE_CHECKING:
    from kdecli.measure.config import RunConfig
    from kdecli.qkv import QKV


@dataclass(frozen=True)
class Setting:
    """How one input is measured: resolved, checked, and the context of its record keys.

    ``input_digest`` and ``layer`` name the input (``QKV.digest``: its bytes, not its path);
    ``rows`` is the reference's sampled query rows (None: every row) and ``reference`` its name
    in keys (``full``, or ``rows:R@seed``)."""

    input_digest: str
    layer: int | None
    device: torch.device
    dtype: torch.dtype
    scale: float
    mask: Mask
    rows: int | None
    reference: str
    budget_mode: str
    bound: bool
    timing: bool
    backward: bool

    @classmethod
    def of(cls, qkv: QKV, config: RunConfig) -> Setting:
        """Resolve ``config`` on ``qkv``; a ``UsageError`` for what this input cannot take (a
        device that is absent, a bad scale, a query offset outside 0..n_k − n_q)."""
        shape = qkv.shape
        mask = resolve_mask(
            qkv.causal(config.causal), config.query_offset, shape["n_q"], shape["n_k"]
        )
        device = config.device
        device = device if isinstance(device, torch.device) else resolve_device(device)
        dtype = config.dtype
        dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype) or qkv.q.dtype
        scale = qkv.scale(config.scale)
        if not math.isfinite(scale) or scale <= 0:
            raise UsageError(f"--scale must be a positive number; got {scale}.")
        plan = resolve_reference(config.reference, shape)
        reference = "full" if plan.rows is None else f"rows:{plan.rows}@{config.seed}"
        return cls(
            input_digest=qkv.digest,
            layer=qkv.layer,
            device=device,
            dtype=dtype,
            scale=scale,
            mask=mask,
            rows=plan.rows,
            reference=reference,
            budget_mode=config.budget_mode,
            bound=config.bound,
            timing=config.timing,
            backward=config.backward,
        )

    @property
    def causal(self) -> bool:
        return self.mask.is_causal

    @property
    def query_offset(self) -> int:
        """Where the first query sits among the keys (0 without a causal mask)."""
        return self.mask.offset if isinstance(self.mask, Causal) else 0

    def key_fields(self) -> dict[str, Any]:
        """What every record key of this input hashes beside the method's own fields."""
        fields: dict[str, Any] = {
            "input_digest": self.input_digest,
            "layer": self.layer,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device.type,  # the kind: the same job on another GPU is the same
            "scale": self.scale,
            "causal": self.causal,
            "reference": self.reference,
            "budget_mode": self.budget_mode,
            "bound": self.bound,
            "timing": self.timing,
            "backward": self.backward,
        }
        if self.query_offset:
            fields["query_offset"] = self.query_offset
        return fields

    def measuring_cost(self, shape: dict[str, int]) -> float:
        """FLOPs of measuring one output against the reference, which every record pays on top
        of its call: per slice, rel_spectral's SVD of the (rows × d_v) error (≈ 4·rows·d_v²)
        and the row norms.  It matters: on GloVe at n = 4096 it is as large as a kdeformer call
        at budget 64."""
        n_q, d_v = shape["n_q"], shape["d_v"]
        rows = n_q if self.rows is None else min(n_q, self.rows)
        return shape["b"] * shape["h"] * rows * (4.0 * d_v * d_v + 10.0 * d_v)


def resolve_mask(causal: bool, offset: int | None, n_q: int, n_k: int) -> Mask:
    """The mask of the causal flag and ``--query-offset`` on n_q × n_k inputs (causal queries
    default to the last n_q positions); an offset that puts a query past the last key is refused
    with the allowed range, as is a causal mask over fewer keys than queries."""
    if causal and offset is not None and n_q <= n_k and offset > n_k - n_q:
        raise UsageError(
            f"--query-offset must be in 0..{n_k - n_q} for n_q = {n_q} queries over n_k = {n_k} "
            f"keys (the last query sits at offset + n_q − 1 < n_k); got {offset}."
        )
    return mask_of(causal, offset, n_q, n_k)
