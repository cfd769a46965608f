"""``glove:SPEC``: GloVe word vectors as Q, K, V by the KDEformer paper's protocol.

SPEC is a Stanford ``glove.*.txt``, its ``.zip`` (``#50`` picks a member by dim), a ``.npy`` cache
file, or a name in the download cache: ``6B.50d``, ``twitter.27B.100d``, ``42B.300d``, ``840B.300d``
(``kdecli download-glove`` fills the cache; see ``kdecli.sources.glove_cache``).

The paper's protocol (``demo_glove.py`` of the KDEformer reference code): with b = 8 and L = 16384,

    Q = rows[0 : bL].reshape(b, L, d)[:, :n]       K = Q
    V = rows[2bL : 3bL].reshape(b, L, d)[:, :n]    softmax scale 10**-0.5

(the reference divides Q and K by 10**0.25 each and applies no other scale), one head, so Q, K, V
are ``(b, 1, n, d)``.  ``--batch`` sets b and ``--n`` sets n; an n above L lengthens the blocks.
The input is named ``glove:6B.50d`` for a cached name and by ``display_path`` for a file.
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from kdecli.download import member_damage, resolve_cache_dir, zip_problem
from kdecli.errors import InputError, UsageError
from kdecli.sources.base import InputOptions, InputSource, Loaded
from kdecli.sources.glove_cache import (
    cache_paths,
    cached_name,
    check_dim,
    get_variant,
    load_cache,
    member_dims,
)
from kdecli.sources.glove_text import parse_glove_text
from kdecli.sources.names import display_path
from kdecli.sources.registry import register

GLOVE_SCALE = 10**-0.5
DEFAULT_BATCH = 8
DEFAULT_MAX_LEN = 16384


@register
class Glove(InputSource):
    name = "glove"
    summary = "GloVe vectors (text, zip, .npy or a cached name) as Q, K, V by the KDEformer paper's protocol."
    form = "glove:PATH|NAME"

    def read(self, spec: str, options: InputOptions) -> Loaded:
        return read_glove(spec, n=options.n, batch=options.batch or DEFAULT_BATCH)


def glove_qkv(
    vectors: np.ndarray,
    n: int | None = None,
    batch: int = DEFAULT_BATCH,
    max_len: int = DEFAULT_MAX_LEN,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V of shape (batch, 1, n, d) from GloVe rows by the paper's protocol (module docstring)."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise InputError(
            f"GloVe vectors must be a 2-D array (rows, dim); got shape {vectors.shape}."
        )
    for name, value in (("batch", batch), ("max_len", max_len)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise UsageError(f"glove: `{name}` must be a positive integer; got {value!r}.")
    n = max_len if n is None else n
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= max_len:
        raise UsageError(f"glove: `n` must be an integer in [1, {max_len}]; got {n!r}.")
    rows, d = vectors.shape
    block = batch * max_len
    if rows < 3 * block:
        raise InputError(
            f"the GloVe protocol with batch {batch} and max_len {max_len} needs {3 * block:,} rows "
            f"(3 × {batch} × {max_len}); the input has {rows:,}.",
            hint="Use a smaller --batch, or a larger GloVe file (twitter.27B has about 1.2 million rows).",
        )

    def take(start: int) -> torch.Tensor:
        part = vectors[start : start + block].reshape(batch, max_len, d)[:, :n]
        return torch.from_numpy(
            np.array(part, dtype=np.result_type(part.dtype, np.float32))
        ).unsqueeze(1)

    q = take(0)
    return q, q.clone(), take(2 * block)


_NAME = re.compile(r"(?:glove\.)?(?P<corpus>[A-Za-z0-9.]+?)(?:\.(?P<dim>\d+)d)?")


def resolve_glove_source(
    spec: str, cache_dir: str | os.PathLike | None = None, *, max_rows: int | None = None
) -> np.ndarray:
    """The GloVe vectors (rows, dim) named by an INPUT ``glove:SPEC`` (the prefix is optional).

    SPEC is one of: a Stanford ``glove.*.txt``; its ``.zip`` (a single ``*.txt`` member is taken;
    with several, select one by dim: ``glove:glove.6B.zip#50``); a ``.npy`` cache file; a name
    in the cache folder: ``6B.50d``, ``twitter.27B.100d``, ``42B.300d``, ``840B.300d``.
    ``max_rows`` stops parsing a text after that many rows.  Cache files are memory-mapped.
    """
    return _resolve(spec, cache_dir, max_rows)[0]


def _resolve(spec: str, cache_dir, max_rows: int | None) -> tuple[np.ndarray, str, str]:
    """(vectors, the input's name for reports, a description with the path for messages)."""
    text = spec.removeprefix("glove:").strip()
    if not text:
        raise UsageError(
            "`glove:` needs a file or a name, e.g. glove:6B.50d or glove:/data/glove.6B.50d.txt."
        )
    pick = None
    head, sep, frag = text.rpartition("#")
    if sep and head.lower().endswith(".zip"):
        text, pick = head, frag.lower().removesuffix("d")
        if not pick.isdigit():
            raise UsageError(
                f"`glove:{text}#{frag}`: the part after # must be a dim such as 50; got {frag!r}."
            )
    path = Path(text).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npy":
            array = load_cache(path)
            name = f"glove:{display_path(path, cached_name)}"
            described = f"glove:{path} ({array.shape[0]:,} × {array.shape[1]})"
            return (array if max_rows is None else array[:max_rows]), name, described
        if suffix == ".zip":
            return _from_zip(path, pick, max_rows)
        with open(path, "rb") as stream:
            array = parse_glove_text(stream, source=str(path), max_rows=max_rows)[0]
        described = f"glove:{path} (text, {array.shape[0]:,} rows of width {array.shape[1]} read)"
        return array, f"glove:{display_path(path)}", described
    if path.exists():
        raise InputError(
            f"`glove:{text}`: {path} is not a file; give a glove.*.txt, its .zip or a .npy cache."
        )
    match = _NAME.fullmatch(text)
    variant = None
    if match and not re.search(r"\.(txt|zip|npy)$", text, re.IGNORECASE):
        try:
            variant = get_variant(match["corpus"])
        except UsageError:
            pass
    if variant is None:
        raise InputError(
            f"`glove:{text}`: no such file {path}, and no GloVe corpus of that name.",
            hint="glove: takes a glove.*.txt, its .zip, a .npy cache, or a cached name such as "
            "6B.50d or twitter.27B.100d.",
        )
    if match["dim"] is None and len(variant.dims) > 1:
        dims = ", ".join(f"glove:{variant.short_name}.{d}d" for d in variant.dims)
        raise UsageError(f"`glove:{text}` needs a dim: {dims}.")
    dim = check_dim(variant, int(match["dim"] or variant.dims[0]))
    cache = resolve_cache_dir(cache_dir)
    vectors_path = cache_paths(cache, variant, dim)[0]
    if not vectors_path.exists():
        raise UsageError(
            f"GloVe {variant.short_name} {dim}d is not in the cache folder {cache}.",
            hint=f"Run `kdecli download-glove --corpus {variant.short_name} --dim {dim}` first.",
        )
    rebuild = (
        f"Run `kdecli download-glove --corpus {variant.short_name} --dim {dim}` to rebuild it."
    )
    array = load_cache(vectors_path, hint=rebuild)
    name, described = (
        f"glove:{variant.short_name}.{dim}d",
        f"glove:{variant.stem(dim)} ({vectors_path})",
    )
    return (array if max_rows is None else array[:max_rows]), name, described


def _from_zip(path: Path, pick: str | None, max_rows: int | None) -> tuple[np.ndarray, str, str]:
    problem = zip_problem(path)
    if problem:
        raise InputError(f"{path} is not a valid zip archive ({problem}).")
    with zipfile.ZipFile(path) as zf:
        texts = [name for name in zf.namelist() if name.lower().endswith(".txt")]
        by_dim = member_dims(texts)
        if pick is not None:
            if int(pick) not in by_dim:
                dims = ", ".join(map(str, by_dim)) or "none"
                raise InputError(
                    f"{path} holds no member for dim {pick}; the dims it holds: {dims}."
                )
            member = by_dim[int(pick)]
        elif len(texts) == 1:
            member = texts[0]
        else:
            choices = ", ".join(f"glove:{path}#{d}" for d in by_dim) or "none"
            raise UsageError(
                f"{path} holds {len(texts)} text members ({', '.join(texts) or 'none'}); "
                f"pick one by dim: {choices}."
            )
        try:
            try:
                with zf.open(member) as stream:
                    source = f"{path}:{member}"
                    array = parse_glove_text(stream, source=source, max_rows=max_rows)[0]
            except InputError:  # a parse error may be the first sign of damage
                damage = member_damage(zf, zf.getinfo(member))
                if damage is None:
                    raise
                raise zipfile.BadZipFile(damage) from None
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise InputError(f"{path} is corrupt ({exc}).") from None
    name = f"glove:{display_path(path)}" + (f"#{pick}" if pick is not None else "")
    return (
        array,
        name,
        f"glove:{path}:{member} ({array.shape[0]:,} rows of width {array.shape[1]} read)",
    )


def read_glove(
    spec: str,
    n: int | None = None,
    batch: int = DEFAULT_BATCH,
    cache_dir: str | os.PathLike | None = None,
    *,
    max_len: int = DEFAULT_MAX_LEN,
) -> Loaded:
    """Q, K, V of the INPUT ``glove:SPEC`` by the paper's protocol, named for reports, unvalidated.

    An ``n`` above ``max_len`` lengthens the blocks to ``n`` (the layout stays that of the paper).
    Only the first 3·batch·max_len rows of a text are parsed.
    """
    if isinstance(n, (int, np.integer)) and n > max_len:
        max_len = int(n)
    need = 3 * batch * max_len if isinstance(batch, int) and batch > 0 else None
    vectors, name, described = _resolve(spec, cache_dir, need)
    q, k, v = glove_qkv(vectors, n, batch, max_len)
    protocol = f"paper protocol: batch {batch}, n {q.shape[2]}, blocks of {max_len} rows"
    return Loaded(
        q,
        k,
        v,
        name=name,
        where=f"{described}; {protocol}",
        scale=GLOVE_SCALE,
        notes={"read": described, "protocol": protocol},
    )


def load_glove_input(
    spec: str,
    n: int | None = None,
    batch: int = DEFAULT_BATCH,
    cache_dir: str | os.PathLike | None = None,
    *,
    max_len: int = DEFAULT_MAX_LEN,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, str]:
    """(q, k, v, default scale, description) of ``read_glove``; the description names the path
    and the protocol.  ``load_input("glove:SPEC")`` gives the validated ``QKV``."""
    loaded = read_glove(spec, n, batch, cache_dir, max_len=max_len)
    return loaded.q, loaded.k, loaded.v, GLOVE_SCALE, loaded.where
