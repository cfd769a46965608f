"""The one validation every input goes through, and the one ``--n`` crop.

``validated`` turns what a source read into a ``QKV`` in the (batch, heads, n, d) layout: arrays of
2, 3 or 4 dimensions (``bnhd`` read as (b, n, h, d)), floating point, not empty, finite, with
matching batch, heads and widths; mixed precisions become the widest.  Every problem raises
``InputError`` naming the input (as the person gave it), the array and what is wrong.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from kdecli.errors import InputError, UsageError
from kdecli.qkv import QKV
from kdecli.sources.base import Loaded


def validated(loaded: Loaded) -> QKV:
    """A checked ``QKV`` from a source's ``Loaded`` record."""
    where, layout = loaded.where or loaded.name, loaded.layout
    t = {
        n: _to_bhnd(_as_tensor(getattr(loaded, n), n, where), n, where, layout)
        for n in ("q", "k", "v")
    }
    q, k, v = t["q"], t["k"], t["v"]
    default_scale = None if loaded.scale is None else _stored_scale(loaded.scale, where)
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise InputError(
            f"{where}: batch and head dimensions differ: Q {tuple(q.shape)}, K {tuple(k.shape)}, "
            f"V {tuple(v.shape)} (read as (b, h, n, d), layout {layout})."
        )
    if q.shape[-1] != k.shape[-1]:
        raise InputError(
            f"{where}: Q has width {q.shape[-1]} but K has width {k.shape[-1]}; they must match."
        )
    if k.shape[-2] != v.shape[-2]:
        raise InputError(
            f"{where}: K has {k.shape[-2]} rows but V has {v.shape[-2]}; every key needs a value."
        )
    for name, tensor in t.items():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise InputError(f"{where}: {name.upper()} holds {bad} NaN or infinite values.")
    dtypes = {tensor.dtype for tensor in t.values()}
    if len(dtypes) > 1:  # mixed precision: keep the widest so nothing is lost on load
        widest = max(dtypes, key=lambda dt: torch.finfo(dt).bits)
        q, k, v = q.to(widest), k.to(widest), v.to(widest)
    return QKV(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        loaded.name,
        layout,
        default_scale,
        dict(loaded.notes or {}),
        default_causal=None if loaded.causal is None else bool(loaded.causal),
        layer=loaded.layer,
    )


def crop(qkv: QKV, n: int | None, where: str | None = None) -> QKV:
    """Keep the first n queries and keys (``--n``); larger than the input is an error."""
    if n is None:
        return qkv
    if n < 1 or n > qkv.k.shape[-2] or n > qkv.q.shape[-2]:
        raise UsageError(
            f"--n must be in [1, {min(qkv.q.shape[-2], qkv.k.shape[-2])}] for {where or qkv.source}; got {n}."
        )
    cropped = (t[..., :n, :].contiguous() for t in (qkv.q, qkv.k, qkv.v))
    return replace(qkv, **dict(zip("qkv", cropped)))


def _as_tensor(value: Any, name: str, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
    else:
        array = np.asarray(value)
        if array.dtype.kind not in "fiub":
            raise InputError(f"{where}: {name.upper()} has dtype {array.dtype}; expected floats.")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if not tensor.is_floating_point():
        raise InputError(
            f"{where}: {name.upper()} holds {str(tensor.dtype).removeprefix('torch.')} values; "
            "attention inputs must be floating point (float16, bfloat16, float32 or float64)."
        )
    if tensor.numel() == 0:
        raise InputError(f"{where}: {name.upper()} is empty (shape {tuple(tensor.shape)}).")
    return tensor


def _to_bhnd(t: torch.Tensor, name: str, where: str, layout: str) -> torch.Tensor:
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t[None]
    if t.dim() == 4:
        return t.permute(0, 2, 1, 3) if layout == "bnhd" else t
    raise InputError(
        f"{where}: {name.upper()} has shape {tuple(t.shape)}; expected (n, d), (h, n, d) or "
        "(b, h, n, d)."
    )


def _stored_scale(value: Any, where: str) -> float:
    array = np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value)
    if array.size != 1 or array.dtype.kind not in "fiu":
        raise InputError(f"{where}: `scale` must be one positive number; got shape {array.shape}.")
    scale = float(array.reshape(()))
    if not math.isfinite(scale) or scale <= 0:
        raise InputError(f"{where}: `scale` must be a positive finite number; got {scale}.")
    return scale
