"""Name -> input source, and ``load_input``: pick the source for an INPUT, read, validate, crop.

Registration refuses duplicate names, a suffix claimed twice and a second ``options`` source; an
unknown ``name:`` prefix is refused with the closest name.  Built-in sources are imported
explicitly by ``kdecli.sources``.
"""

from __future__ import annotations

import re
from dataclasses import replace
from difflib import get_close_matches
from pathlib import Path
from typing import Any, TypeVar

from kdecli.errors import InputError, UsageError, unknown_name
from kdecli.qkv import QKV
from kdecli.sources.base import KINDS, LAYOUTS, InputOptions, InputSource
from kdecli.sources.validate import crop, validated

_SOURCES: dict[str, InputSource] = {}
_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9_-]+")  # what `name:` looks like (not C:\ nor a path)

S = TypeVar("S", bound=type[InputSource])


def register(cls: S) -> S:
    """Class decorator: add a source under ``cls.name``; a second one of that name is an error."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no `name`")
    if cls.kind not in KINDS:
        raise ValueError(
            f"{cls.__qualname__}: `kind` must be one of {', '.join(KINDS)}; got {cls.kind!r}"
        )
    old = _SOURCES.get(cls.name)
    if old is not None and type(old) is not cls:
        raise ValueError(f"an input source named {cls.name!r} is already registered ({type(old)})")
    for other in _SOURCES.values():
        if type(other) is cls:
            continue
        if cls.kind == "options" == other.kind:
            raise ValueError(
                f"{cls.name!r}: the source read from --q/--k/--v is already {other.name!r}"
            )
        if cls.kind == "file" and other.kind == "file" and set(cls.suffixes) & set(other.suffixes):
            taken = ", ".join(sorted(set(cls.suffixes) & set(other.suffixes)))
            raise ValueError(f"{cls.name!r}: the suffix {taken} is already read by {other.name!r}")
    if cls.kind == "file" and not cls.suffixes:
        raise ValueError(f"{cls.__qualname__} is a file format without `suffixes`")
    _SOURCES[cls.name] = cls()
    return cls


def source_names() -> list[str]:
    """Every registered source, in registration order."""
    return list(_SOURCES)


def get_source(name: str) -> InputSource:
    try:
        return _SOURCES[name]
    except KeyError:
        hint = "The sources: " + ", ".join(_SOURCES) + "."
        raise unknown_name("input source", name, _SOURCES, hint) from None


def load_input(spec: str | None = None, options: InputOptions | None = None, **fields: Any) -> QKV:
    """Load one INPUT into a validated ``QKV``, cropped to ``n`` queries and keys when given.

    ``fields`` are ``InputOptions`` fields; they override those of ``options``::

        load_input("acts.npz", layout="bnhd", n=64)
        load_input(None, InputOptions(q="q.npy", k="k.npy", v="v.npy"))
    """
    options = replace(options, **fields) if options is not None else InputOptions(**fields)
    if options.layout not in LAYOUTS:
        raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)}; got {options.layout!r}.")
    source, body = find_source(spec, options)
    loaded = source.read(body, options)
    return crop(validated(loaded), options.n, loaded.where or loaded.name)


def load_inputs(
    spec: str | None = None, options: InputOptions | None = None, **fields: Any
) -> list[QKV]:
    """Every input INPUT names: one, or each layer of a capture (``file.h5:/layer*``, or
    ``all_layers``), in layer order."""
    options = replace(options, **fields) if options is not None else InputOptions(**fields)
    source, body = find_source(spec, options)
    expand = getattr(source, "expand", None)
    if expand is None:
        if options.all_layers:
            raise UsageError(
                f"--all-layers reads every layer of a capture (an HDF5 file); {spec} has no layers."
            )
        return [load_input(spec, options)]
    one = replace(options, all_layers=False)
    return [load_input(part, one) for part in expand(body, options)]


def find_source(spec: str | None, options: InputOptions) -> tuple[InputSource, str]:
    """The source that reads INPUT ``spec``, and the spec its ``read`` gets."""
    if spec is None:
        if not (options.q and options.k and options.v):
            raise UsageError(
                "no input given.",
                hint=f"Give INPUT ({_forms()}) or all of --q a.npy --k b.npy --v c.npy.",
            )
        return next(s for s in _SOURCES.values() if s.kind == "options"), ""
    if options.q or options.k or options.v:
        raise UsageError("give either INPUT or --q/--k/--v, not both.")
    prefix, sep, body = spec.partition(":")
    source = _SOURCES.get(prefix) if sep else None
    if source is not None and source.kind == "prefix":
        return source, body
    if sep and _PREFIX.fullmatch(prefix) and not Path(spec).exists():
        prefixes = [s.name for s in _SOURCES.values() if s.kind == "prefix"]
        close = get_close_matches(prefix, prefixes, n=1)
        hint = f" Did you mean `{close[0]}:`?" if close else ""
        raise UsageError(
            f"unknown input source `{prefix}:` in `{spec}`, and no file of that name.{hint}",
            hint=f"INPUT is one of: {_forms()}.",
        )
    path, _ = split_location(spec)
    if not path.exists():
        head = spec.rpartition(":")[0]
        if head and Path(head).is_file():  # FILE:/group of a file that is not named .h5
            raise InputError(
                f"{head}: is an HDF5 file; name it with .h5 or .hdf5 to read its groups."
                if is_hdf5(Path(head))
                else f"{head}: is not an HDF5 file (FILE:/group reads a group of one)."
            )
        raise InputError(f"{path}: no such file.")
    suffix = path.suffix.lower()
    for source in _SOURCES.values():
        if source.kind == "file" and suffix in source.suffixes:
            if source.locations and path.is_file() and not is_hdf5(path):
                raise InputError(f"{path}: is not an HDF5 file.")
            return source, spec
    raise InputError(
        f"{path}: unknown input format {suffix or '(no suffix)'}.",
        hint=f"Use one of: {_forms()}, or three .npy files (--q/--k/--v).",
    )


def split_location(spec: str) -> tuple[Path, str | None]:
    """``file.h5:/layer3/attn`` -> (file.h5, /layer3/attn) for a format with locations; else no location."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and not Path(spec).exists():
        suffix = Path(head).suffix.lower()
        if any(s.locations and suffix in s.suffixes for s in _SOURCES.values()):
            return Path(head), tail or "/"
    return Path(spec), None


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def is_hdf5(path: Path) -> bool:
    """Does ``path`` hold HDF5's signature (at byte 0, or after a user block of 512·2^k bytes)?"""
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            offset = 0
            while offset + len(HDF5_SIGNATURE) <= size:
                f.seek(offset)
                if f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                    return True
                offset = 512 if offset == 0 else 2 * offset
    except OSError:
        return False
    return False


def _forms() -> str:
    """Every INPUT form a source takes, for hints: "file.npz, file.h5[:/group], …, glove:PATH|NAME"."""
    return ", ".join(s.form for s in _SOURCES.values() if s.kind != "options")
