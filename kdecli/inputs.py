"""Every INPUT form, loaded into one ``QKV`` in the (batch, heads, n, d) layout, with validation.

Forms: ``file.npz``; ``file.h5[:/group]`` (HDF5); three ``.npy`` files (``--q/--k/--v``); ``file.pt``
(a dict of tensors saved with ``torch.save``); each may also hold a scalar ``scale``, the softmax
temperature its producer used, which becomes the default scale; ``glove:PATH`` (the KDEformer paper's protocol);
``synthetic:n=…,d=…,b=…,h=…,seed=…,kind=gaussian|clustered``.  Arrays may be (n, d), (h, n, d) or
(b, h, n, d); ``layout="bnhd"`` reads (b, n, h, d) as the KDEformer reference code writes it.
Every problem raises ``InputError`` naming the file, the array and what is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdecli.errors import InputError, UsageError

NAME_CHOICES = {"q": ("q", "query"), "k": ("k", "key"), "v": ("v", "value")}
LAYOUTS = ("bhnd", "bnhd")
DTYPES = {
    "float64": torch.float64, "float32": torch.float32,
    "float16": torch.float16, "bfloat16": torch.bfloat16,
}


@dataclass
class QKV:
    """Queries (b, h, n_q, d), keys (b, h, n_k, d), values (b, h, n_k, d_v) and where they came from."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    source: str
    layout: str = "bhnd"
    default_scale: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> dict[str, int]:
        b, h, n_q, d = self.q.shape
        return {"b": b, "h": h, "n_q": n_q, "n_k": self.k.shape[-2], "d": d, "d_v": self.v.shape[-1]}

    def scale(self, override: float | None = None) -> float:
        """The softmax temperature: an explicit value, else the input's own, else 1/√d."""
        if override is not None:
            return float(override)
        if self.default_scale is not None:
            return self.default_scale
        return 1.0 / math.sqrt(self.q.shape[-1])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "QKV":
        dtype = dtype or self.q.dtype
        return QKV(
            self.q.to(device, dtype), self.k.to(device, dtype), self.v.to(device, dtype),
            self.source, self.layout, self.default_scale, dict(self.notes),
        )


def load_input(
    spec: str | None, *, q: str | None = None, k: str | None = None, v: str | None = None,
    q_key: str | None = None, k_key: str | None = None, v_key: str | None = None,
    layout: str = "bhnd", n: int | None = None, batch: int | None = None,
) -> QKV:
    """Load one INPUT (see the module docstring) and validate it."""
    if layout not in LAYOUTS:
        raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)}; got {layout!r}.")
    keys = {"q": q_key, "k": k_key, "v": v_key}
    if spec is None:
        if not (q and k and v):
            raise UsageError(
                "no input given.",
                hint="Give INPUT (file.npz, file.h5, file.pt, glove:PATH, synthetic:…) or all of "
                "--q a.npy --k b.npy --v c.npy.",
            )
        arrays = {name: _load_npy(Path(path), name) for name, path in (("q", q), ("k", k), ("v", v))}
        source = f"npy:{q},{k},{v}"
    elif q or k or v:
        raise UsageError("give either INPUT or --q/--k/--v, not both.")
    elif spec.startswith("synthetic:"):
        return _crop(synthetic(spec), n)
    elif spec.startswith("glove:"):
        from kdecli.glove import load_glove_input

        gq, gk, gv, scale, description = load_glove_input(spec[len("glove:"):], n=n, batch=batch or 8)
        return _validated(
            {"q": gq, "k": gk, "v": gv}, description, "bhnd", default_scale=scale,
        )
    else:
        path, group = _split_group(spec)
        suffix = path.suffix.lower()
        if not path.exists():
            raise InputError(f"{path}: no such file.")
        if suffix == ".npz":
            arrays = _load_npz(path, keys)
        elif suffix in (".h5", ".hdf5"):
            arrays = _load_h5(path, group, keys)
        elif suffix in (".pt", ".pth"):
            arrays = _load_pt(path, keys)
        else:
            raise InputError(
                f"{path}: unknown input format {suffix or '(no suffix)'}.",
                hint="Use .npz, .h5/.hdf5, .pt, three .npy files (--q/--k/--v), glove:PATH or "
                "synthetic:n=…,d=….",
            )
        source = spec
    return _crop(_validated(arrays, source, layout), n)


# ---- file formats ------------------------------------------------------------------------------

def _split_group(spec: str) -> tuple[Path, str | None]:
    """``file.h5:/layer3/attn`` -> (file.h5, /layer3/attn); a plain path has no group."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and Path(head).suffix.lower() in (".h5", ".hdf5") and not Path(spec).exists():
        return Path(head), tail or "/"
    return Path(spec), None


def _pick(available: list[str], name: str, explicit: str | None, where: str) -> str:
    if explicit is not None:
        if explicit not in available:
            raise InputError(
                f"{where}: no array named {explicit!r} for {name.upper()}; it holds: "
                f"{', '.join(available) or 'nothing'}."
            )
        return explicit
    for candidate in NAME_CHOICES[name]:
        if candidate in available:
            return candidate
    raise InputError(
        f"{where}: no array for {name.upper()} (looked for {' or '.join(map(repr, NAME_CHOICES[name]))});"
        f" it holds: {', '.join(available) or 'nothing'}.",
        hint=f"Name it with --{name}-key.",
    )


def _load_npy(path: Path, name: str) -> np.ndarray:
    if not path.exists():
        raise InputError(f"{path}: no such file (given as --{name}).")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"{path}: cannot read as .npy ({exc}).") from None


def _load_npz(path: Path, keys: dict[str, str | None]) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            arrays = {n: archive[_pick(names, n, keys[n], str(path))] for n in ("q", "k", "v")}
            if "scale" in names:
                arrays["scale"] = archive["scale"]
            return arrays
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read as .npz ({exc}).") from None


def _load_h5(path: Path, group: str | None, keys: dict[str, str | None]) -> dict[str, Any]:
    import h5py

    try:
        handle = h5py.File(path, "r")
    except Exception as exc:
        raise InputError(f"{path}: cannot read as HDF5 ({exc}).") from None
    with handle:
        node = handle
        where = f"{path}:{group}" if group else str(path)
        if group and group != "/":
            if group not in handle:
                raise InputError(f"{path}: no group {group!r}; top level holds: {', '.join(handle)}.")
            node = handle[group]
            if not isinstance(node, h5py.Group):
                raise InputError(f"{where} is a dataset, not a group holding q, k, v.")
        names = [name for name, item in node.items() if isinstance(item, h5py.Dataset)]
        arrays = {n: node[_pick(names, n, keys[n], where)][()] for n in ("q", "k", "v")}
        if "scale" in names:
            arrays["scale"] = node["scale"][()]
        return arrays


def _load_pt(path: Path, keys: dict[str, str | None]) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: cannot read as a torch file ({exc}).") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: holds a {type(data).__name__}; expected a dict of tensors q, k, v.")
    names = [str(key) for key in data]
    arrays = {n: data[_pick(names, n, keys[n], str(path))] for n in ("q", "k", "v")}
    if "scale" in data:
        arrays["scale"] = data["scale"]
    return arrays


# ---- validation --------------------------------------------------------------------------------

def _as_tensor(value: Any, name: str, source: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
    else:
        array = np.asarray(value)
        if array.dtype.kind not in "fiub":
            raise InputError(f"{source}: {name.upper()} has dtype {array.dtype}; expected floats.")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if not tensor.is_floating_point():
        raise InputError(
            f"{source}: {name.upper()} holds {str(tensor.dtype).removeprefix('torch.')} values; "
            "attention inputs must be floating point (float16, bfloat16, float32 or float64)."
        )
    if tensor.numel() == 0:
        raise InputError(f"{source}: {name.upper()} is empty (shape {tuple(tensor.shape)}).")
    return tensor


def _to_bhnd(t: torch.Tensor, name: str, source: str, layout: str) -> torch.Tensor:
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t[None]
    if t.dim() == 4:
        return t.permute(0, 2, 1, 3) if layout == "bnhd" else t
    raise InputError(
        f"{source}: {name.upper()} has shape {tuple(t.shape)}; expected (n, d), (h, n, d) or "
        "(b, h, n, d)."
    )


def _validated(
    arrays: dict[str, Any], source: str, layout: str, default_scale: float | None = None
) -> QKV:
    t = {n: _to_bhnd(_as_tensor(arrays[n], n, source), n, source, layout) for n in ("q", "k", "v")}
    q, k, v = t["q"], t["k"], t["v"]
    if "scale" in arrays:
        default_scale = _stored_scale(arrays["scale"], source)
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise InputError(
            f"{source}: batch and head dimensions differ: Q {tuple(q.shape)}, K {tuple(k.shape)}, "
            f"V {tuple(v.shape)} (read as (b, h, n, d), layout {layout})."
        )
    if q.shape[-1] != k.shape[-1]:
        raise InputError(f"{source}: Q has width {q.shape[-1]} but K has width {k.shape[-1]}; they must match.")
    if k.shape[-2] != v.shape[-2]:
        raise InputError(
            f"{source}: K has {k.shape[-2]} rows but V has {v.shape[-2]}; every key needs a value."
        )
    for name, tensor in t.items():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise InputError(f"{source}: {name.upper()} holds {bad} NaN or infinite values.")
    dtypes = {tensor.dtype for tensor in t.values()}
    if len(dtypes) > 1:  # mixed precision: keep the widest so nothing is lost on load
        widest = max(dtypes, key=lambda dt: torch.finfo(dt).bits)
        q, k, v = q.to(widest), k.to(widest), v.to(widest)
    return QKV(q.contiguous(), k.contiguous(), v.contiguous(), source, layout, default_scale)


def _stored_scale(value: Any, source: str) -> float:
    array = np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value)
    if array.size != 1 or array.dtype.kind not in "fiu":
        raise InputError(f"{source}: `scale` must be one positive number; got shape {array.shape}.")
    scale = float(array.reshape(()))
    if not math.isfinite(scale) or scale <= 0:
        raise InputError(f"{source}: `scale` must be a positive finite number; got {scale}.")
    return scale


def _crop(qkv: QKV, n: int | None) -> QKV:
    """Keep the first n queries and keys (``--n``); larger than the input is an error."""
    if n is None:
        return qkv
    if n < 1 or n > qkv.k.shape[-2] or n > qkv.q.shape[-2]:
        raise UsageError(
            f"--n must be in [1, {min(qkv.q.shape[-2], qkv.k.shape[-2])}] for {qkv.source}; got {n}."
        )
    return QKV(qkv.q[..., :n, :].contiguous(), qkv.k[..., :n, :].contiguous(),
               qkv.v[..., :n, :].contiguous(), qkv.source, qkv.layout, qkv.default_scale, qkv.notes)


# ---- synthetic ---------------------------------------------------------------------------------

SYNTHETIC_DEFAULTS = {"n": 1024, "d": 64, "b": 1, "h": 1, "seed": 0, "kind": "gaussian"}


def synthetic(spec: str) -> QKV:
    """``synthetic:n=4096,d=64,b=2,h=4,seed=0[,kind=gaussian|clustered][,nq=…][,dv=…]``.

    gaussian:  q, k, v i.i.d. N(0, 1).
    clustered: 16 centres per slice; q and k are a centre plus N(0, 0.3²) noise (k shares the
               centres of q), v i.i.d. N(0, 1): peaked attention that rewards LSH-based methods.
    """
    body = spec[len("synthetic:"):]
    options: dict[str, Any] = dict(SYNTHETIC_DEFAULTS)
    for item in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in {*SYNTHETIC_DEFAULTS, "nq", "dv"}:
            raise UsageError(
                f"synthetic input: cannot read {item!r}; expected key=value with keys "
                "n, nq, d, dv, b, h, seed, kind."
            )
        if key == "kind":
            if value not in ("gaussian", "clustered"):
                raise UsageError(f"synthetic input: kind must be gaussian or clustered; got {value!r}.")
            options[key] = value
        else:
            try:
                options[key] = int(value)
            except ValueError:
                raise UsageError(f"synthetic input: {key} must be an integer; got {value!r}.") from None
            if options[key] < (0 if key == "seed" else 1):
                raise UsageError(f"synthetic input: {key} must be positive; got {value}.")
    b, h, n, d = options["b"], options["h"], options["n"], options["d"]
    n_q, d_v = options.get("nq", n), options.get("dv", d)
    gen = torch.Generator().manual_seed(options["seed"])
    if options["kind"] == "gaussian":
        q = torch.randn(b, h, n_q, d, generator=gen)
        k = torch.randn(b, h, n, d, generator=gen)
    else:
        centres = torch.randn(b, h, 16, d, generator=gen) * 2
        q = _around(centres, n_q, gen)
        k = _around(centres, n, gen)
    v = torch.randn(b, h, n, d_v, generator=gen)
    return QKV(q, k, v, spec, "bhnd")


def _around(centres: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    b, h, c, d = centres.shape
    which = torch.randint(0, c, (b, h, n), generator=gen)
    picked = torch.gather(centres, 2, which.unsqueeze(-1).expand(b, h, n, d))
    return picked + 0.3 * torch.randn(b, h, n, d, generator=gen)


def resolve_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}; got {name!r}.") from None


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without one is a usage error with the reason."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu or cuda[:i]; got {name!r}.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for, but torch sees no CUDA device.",
                             hint="Use --device cpu or --device auto.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present.")
    elif device.type != "cpu":
        raise UsageError(f"--device must be auto, cpu or cuda[:i]; got {name!r}.")
    return device
