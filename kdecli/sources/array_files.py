"""Array files: ``file.npz``, ``file.h5[:/group]`` (HDF5), ``file.pt`` (``torch.save`` of a dict) and
three ``.npy`` files given as ``--q/--k/--v``.

Each holds Q, K and V under the names ``q``, ``k``, ``v`` (also accepted: ``query``, ``key``,
``value``; ``--q-key/--k-key/--v-key`` name others), and may hold a scalar ``scale``, the softmax
temperature its producer used, which becomes the input's default scale.  Arrays may be (n, d),
(h, n, d) or (b, h, n, d); ``--layout bnhd`` reads (b, n, h, d).  A problem reading a file raises
``InputError`` naming the file and, where there is one, the array.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import numpy as np
import torch

from kdecli.errors import InputError
from kdecli.sources.base import InputOptions, InputSource, Loaded
from kdecli.sources.names import display_path
from kdecli.sources.registry import register, split_location

NAME_CHOICES = {"q": ("q", "query"), "k": ("k", "key"), "v": ("v", "value")}
ROLES = ("q", "k", "v")


@register
class NpzFile(InputSource):
    name = "npz"
    kind = "file"
    summary = "A numpy .npz archive holding q, k, v (and optionally scale)."
    form = "file.npz"
    suffixes = (".npz",)

    def read(self, spec: str, options: InputOptions) -> Loaded:
        path = Path(spec)
        try:
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                arrays = {n: archive[pick(names, n, options.keys[n], str(path))] for n in ROLES}
                scale = archive["scale"] if "scale" in names else None
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{path}: cannot read as .npz ({exc}).") from None
        return Loaded(
            **arrays, name=display_path(path), where=spec, layout=options.layout, scale=scale
        )


@register
class Hdf5File(InputSource):
    name = "hdf5"
    kind = "file"
    summary = (
        "An HDF5 file holding datasets q, k, v (and optionally scale), at the top or in a group."
    )
    form = "file.h5[:/group]"
    suffixes = (".h5", ".hdf5")
    locations = True

    def read(self, spec: str, options: InputOptions) -> Loaded:
        import h5py

        path, group = split_location(spec)
        try:
            handle = h5py.File(path, "r")
        except Exception as exc:
            raise InputError(f"{path}: cannot read as HDF5 ({exc}).") from None
        with handle:
            node = handle
            where = f"{path}:{group}" if group else str(path)
            if group and group != "/":
                if group not in handle:
                    raise InputError(
                        f"{path}: no group {group!r}; top level holds: {', '.join(handle)}."
                    )
                node = handle[group]
                if not isinstance(node, h5py.Group):
                    raise InputError(f"{where} is a dataset, not a group holding q, k, v.")
            names = [name for name, item in node.items() if isinstance(item, h5py.Dataset)]
            layers = [n for n, item in node.items() if isinstance(item, h5py.Group) and "q" in item]
            if not names and layers:  # a capture: its arrays are one group per layer
                raise InputError(
                    f"{where}: holds {len(layers)} layers ({', '.join(layers[:4])}"
                    f"{', …' if len(layers) > 4 else ''}), not q, k, v.",
                    hint=f"Pick one ({path}:/{layers[0]}) or run every layer with --all-layers.",
                )
            arrays = {n: node[pick(names, n, options.keys[n], where)][()] for n in ROLES}
            # a dataset `scale`, or the attributes `kdecli capture` writes on each layer
            scale = node["scale"][()] if "scale" in names else node.attrs.get("scale")
            causal = _flag_attribute(node.attrs.get("causal"), "causal", where)
            layer = _index_attribute(node.attrs.get("layer"), "layer", where)
        name = display_path(path) + (f":{group}" if group else "")
        return Loaded(
            **arrays, name=name, where=spec, layout=options.layout, scale=scale,
            causal=causal, layer=layer,
        )  # fmt: skip

    def expand(self, spec: str, options: InputOptions) -> list[str]:
        """``file.h5:/layer*`` (a glob over groups), or every group holding q, k, v when
        ``all_layers``: one spec per group, in layer order."""
        import h5py

        path, group = split_location(spec)
        pattern = group if group and any(c in group for c in "*?[") else None
        if pattern is None and not options.all_layers:
            return [spec]
        try:
            handle = h5py.File(path, "r")
        except Exception as exc:
            raise InputError(f"{path}: cannot read as HDF5 ({exc}).") from None
        found = []
        with handle:

            def visit(name: str, item) -> None:
                if isinstance(item, h5py.Group) and {"q", "k", "v"} <= set(item):
                    if pattern is None or fnmatch.fnmatchcase("/" + name, pattern):
                        layer = item.attrs.get("layer")
                        where = f"{path}:/{name}"
                        found.append(("/" + name, _index_attribute(layer, "layer", where)))

            handle.visititems(visit)
        if not found:
            what = f"no group matching {pattern!r}" if pattern else "no group holding q, k, v"
            raise InputError(f"{path}: {what}.")
        found.sort(key=lambda g: (g[1] is None, g[1] if g[1] is not None else 0, _natural(g[0])))
        return [f"{path}:{name}" for name, _ in found]


def _flag_attribute(value: object, name: str, where: str) -> bool | None:
    """A boolean attribute as ``kdecli capture`` writes it (a bool, or the integer 0 or 1); the
    strings ``'no'`` or ``b'false'`` are refused, not read as true (any non-empty string is)."""
    if value is None:
        return None
    array = np.asarray(value)
    if array.shape == () and array.dtype.kind in "biu" and array.item() in (0, 1):
        return bool(array.item())
    raise InputError(
        f"{where}: attribute `{name}` must be true or false (0 or 1); got {_shown(value)}."
    )


def _index_attribute(value: object, name: str, where: str) -> int | None:
    """A non-negative integer attribute (a layer's index)."""
    if value is None:
        return None
    array = np.asarray(value)
    if array.shape == () and array.dtype.kind in "iu" and array.item() >= 0:
        return int(array.item())
    raise InputError(
        f"{where}: attribute `{name}` must be a non-negative integer; got {_shown(value)}."
    )


def _shown(value: object) -> str:
    """An attribute's value in a message: short, and only printable characters (repr)."""
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= 60 else text[:59] + "…"


def _natural(name: str) -> list:
    """/layer10 after /layer9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@register
class TorchFile(InputSource):
    name = "pt"
    kind = "file"
    summary = "A torch.save file of a dict of tensors q, k, v (and optionally scale)."
    form = "file.pt"
    suffixes = (".pt", ".pth")

    def read(self, spec: str, options: InputOptions) -> Loaded:
        path = Path(spec)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"{path}: cannot read as a torch file ({exc}).") from None
        if not isinstance(data, dict):
            raise InputError(
                f"{path}: holds a {type(data).__name__}; expected a dict of tensors q, k, v."
            )
        names = [str(key) for key in data]
        arrays = {n: data[pick(names, n, options.keys[n], str(path))] for n in ROLES}
        scale = data["scale"] if "scale" in data else None
        return Loaded(
            **arrays, name=display_path(path), where=spec, layout=options.layout, scale=scale
        )


@register
class NpyFiles(InputSource):
    name = "npy"
    kind = "options"
    summary = "Three .npy files, one array each, given as --q a.npy --k b.npy --v c.npy."
    form = "--q a.npy --k b.npy --v c.npy"

    def read(self, spec: str, options: InputOptions) -> Loaded:
        paths = {"q": options.q, "k": options.k, "v": options.v}
        arrays = {n: _load_npy(Path(paths[n]), n) for n in ROLES}
        name = "npy:" + ",".join(display_path(paths[n]) for n in ROLES)
        return Loaded(
            **arrays,
            name=name,
            where=f"npy:{options.q},{options.k},{options.v}",
            layout=options.layout,
        )


def pick(available: list[str], role: str, explicit: str | None, where: str) -> str:
    """The array to read for ``role`` (q, k or v): the one asked for, else the first usual name."""
    if explicit is not None:
        if explicit not in available:
            raise InputError(
                f"{where}: no array named {explicit!r} for {role.upper()}; it holds: "
                f"{', '.join(available) or 'nothing'}."
            )
        return explicit
    for candidate in NAME_CHOICES[role]:
        if candidate in available:
            return candidate
    raise InputError(
        f"{where}: no array for {role.upper()} (looked for {' or '.join(map(repr, NAME_CHOICES[role]))});"
        f" it holds: {', '.join(available) or 'nothing'}.",
        hint=f"Name it with --{role}-key.",
    )


def _load_npy(path: Path, role: str) -> np.ndarray:
    if not path.exists():
        raise InputError(f"{path}: no such file (given as --{role}).")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"{path}: cannot read as .npy ({exc}).") from None
