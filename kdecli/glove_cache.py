"""The GloVe binary cache: the Stanford variants, what the cache folder holds, and ``download_glove``,
which fills it (download, extraction of one dim, conversion from text).

The cache folder (``kdecli.download.resolve_cache_dir``) holds::

    glove.6B.zip                 the archive as downloaded (kept: another dim needs no download)
    glove.6B.zip.incomplete      a partial download; the next run resumes it with an HTTP Range
    glove.6B.50d.npy             float32 (rows, 50); loads in milliseconds with mmap
    glove.6B.50d.words.txt       the words, as UTF-8 bytes from the text, one per line, same order

Every file is written as ``NAME.incomplete`` and moved into place with ``os.replace`` only once it
is whole and verified, so a file under its final name is always complete; the ``.npy`` is moved
last, and its presence marks a finished cache.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path

import numpy as np

from kdecli.download import (
    DEFAULT_TIMEOUT_S,
    Hints,
    NullProgress,
    Progress,
    check_sha256,
    download,
    ensure_cache_dir,
    partial_path,
    remove,
    sha256_file,
    write_failure,
    zip_problem,
)
from kdecli.errors import InputError, RuntimeFailure, UsageError
from kdecli.glove_text import iter_glove_blocks

HINTS = Hints(
    network="Check the network connection, or use --url to point at a mirror, or --from-file at an "
    "archive already on disk.",
    not_zip="Run again to download it anew; if this repeats, check that --url points at a GloVe archive.",
)


@dataclass(frozen=True)
class Variant:
    """One Stanford GloVe archive: ``glove.<corpus>.zip`` holding ``glove.<base>.<dim>d.txt``."""

    corpus: str
    dims: tuple[int, ...]
    # SHA-256 of the archive.  None for every variant: kdecli cannot download them where it is built,
    # and a digest it has not computed itself would be a guess.  `--sha256` supplies one.
    sha256: str | None = None

    @property
    def archive(self) -> str:
        return f"glove.{self.corpus}.zip"

    @property
    def url(self) -> str:
        return f"https://nlp.stanford.edu/data/{self.archive}"

    @property
    def short_name(self) -> str:
        """What `--corpus` takes: 6B, twitter.27B, 42B, 840B."""
        return self.corpus.removesuffix(".300d")

    def stem(self, dim: int) -> str:
        return f"glove.{self.short_name}.{dim}d"

    def member(self, dim: int) -> str:
        return self.stem(dim) + ".txt"


VARIANTS = {
    v.corpus: v
    for v in (
        Variant("6B", (50, 100, 200, 300)),
        Variant("twitter.27B", (25, 50, 100, 200)),
        Variant("42B.300d", (300,)),
        Variant("840B.300d", (300,)),
    )
}
_ALIASES = {"twitter": "twitter.27B", "27b": "twitter.27B", "42b": "42B.300d", "840b": "840B.300d"}


def get_variant(corpus: str) -> Variant:
    """The variant for a corpus name: 6B, twitter.27B, 42B(.300d), 840B(.300d); case is ignored."""
    key = corpus.strip().lower().removeprefix("glove.").removesuffix(".zip")
    by_lower = {name.lower(): v for name, v in VARIANTS.items()}
    found = by_lower.get(_ALIASES.get(key, key).lower())
    if found is None:
        names = ["6B", "twitter.27B", "42B", "840B"]
        close = get_close_matches(key, [name.lower() for name in names], n=1)
        did_you = (
            f" Did you mean `{names[[n.lower() for n in names].index(close[0])]}`?" if close else ""
        )
        raise UsageError(
            f"unknown GloVe corpus `{corpus}`.{did_you}",
            hint="Choose one of " + ", ".join(names) + ".",
        )
    return found


def check_dim(variant: Variant, dim: int) -> int:
    if dim not in variant.dims:
        dims = ", ".join(map(str, variant.dims))
        raise UsageError(f"GloVe {variant.short_name} comes in dims {dims}; got --dim {dim}.")
    return dim


def cache_paths(cache_dir: Path, variant: Variant, dim: int) -> tuple[Path, Path]:
    """(vectors .npy, words .txt) for one variant and dim inside ``cache_dir``."""
    stem = variant.stem(dim)
    return cache_dir / f"{stem}.npy", cache_dir / f"{stem}.words.txt"


def cached_name(file_name: str) -> str | None:
    """The name ``glove:NAME`` takes for a cache file: ``glove.6B.50d.npy`` -> ``6B.50d``; else None."""
    match = re.fullmatch(r"glove\.(.+\.\d+d)\.npy", file_name)
    return match[1] if match else None


# ---------------------------------------------------------------------------------------------
# The binary cache


_NPY_HEADER_BYTES = 128


def _npy_header(rows: int, dim: int) -> bytes:
    """A .npy v1.0 header for float32 (rows, dim), always 128 bytes so it can be rewritten in place."""
    body = repr({"descr": "<f4", "fortran_order": False, "shape": (rows, dim)}).encode("latin-1")
    pad = _NPY_HEADER_BYTES - 10 - len(body) - 1
    return (
        b"\x93NUMPY\x01\x00" + struct.pack("<H", _NPY_HEADER_BYTES - 10) + body + b" " * pad + b"\n"
    )


def write_cache(
    blocks: Iterable[tuple[list[bytes], np.ndarray]], vectors_path: Path, words_path: Path
) -> int:
    """Stream blocks into ``vectors_path`` (.npy, float32) and ``words_path``; return the row count.

    Both are written as ``.incomplete`` files and moved into place at the end, the vectors last.
    On any failure the temporary files are removed and nothing under the final names changes.
    """
    tmp_vectors, tmp_words = partial_path(vectors_path), partial_path(words_path)
    rows, dim = 0, 0
    try:
        with open(tmp_vectors, "wb") as fv, open(tmp_words, "wb") as fw:
            fv.write(_npy_header(0, 0))
            for words, block in blocks:
                if len(words) == 0:
                    continue
                dim = block.shape[1]
                fv.write(np.ascontiguousarray(block, dtype="<f4").data)
                fw.write(b"\n".join(words) + b"\n")
                rows += len(words)
            if rows == 0:
                raise InputError("the GloVe text holds no vectors.")
            fv.seek(0)
            fv.write(_npy_header(rows, dim))
            for f in (fv, fw):
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp_words, words_path)
        os.replace(tmp_vectors, vectors_path)
    except OSError as exc:
        remove(tmp_vectors, tmp_words)
        raise write_failure(exc, vectors_path) from None
    except BaseException:
        remove(tmp_vectors, tmp_words)
        raise
    return rows


def load_cache(path: str | os.PathLike) -> np.ndarray:
    """The vectors of a cache file (or any 2-D float .npy), memory-mapped read-only."""
    path = Path(path)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{path} is not a readable .npy array ({exc}).",
            hint="Delete it and run `kdecli download-glove` again (or pass --force).",
        ) from None
    if array.ndim != 2 or array.dtype.kind != "f" or array.shape[0] == 0:
        raise InputError(
            f"{path} holds a {array.dtype} array of shape {array.shape}; "
            "GloVe vectors must be a non-empty 2-D float array (rows, dim)."
        )
    return array


def load_words(vectors_path: str | os.PathLike) -> list[str]:
    """The words that go with a cache file, in row order."""
    path = Path(vectors_path).with_suffix(".words.txt")
    return path.read_bytes().decode("utf-8", "replace").split("\n")[:-1]


# ---------------------------------------------------------------------------------------------
# download-glove


@dataclass(frozen=True)
class GloveCache:
    """Where one variant × dim lives in the cache, and what this call had to do to get it there."""

    corpus: str
    dim: int
    vectors_path: Path
    words_path: Path
    archive_path: Path | None
    rows: int
    downloaded: bool
    converted: bool


def download_glove(
    corpus: str = "twitter.27B",
    dim: int = 100,
    *,
    cache_dir: str | os.PathLike | None = None,
    url: str | None = None,
    from_file: str | os.PathLike | None = None,
    sha256: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> GloveCache:
    """Make sure the binary cache of GloVe ``corpus`` at ``dim`` exists; download what is missing.

    Does nothing when the cache is there (unless ``force``).  The archive comes from ``from_file``
    (a .zip, or the glove.*.txt itself; never modified), else the archive already in the cache,
    else ``url`` (default: Stanford's).  ``force`` drops the cached archive, any partial download
    and the converted files, and starts over.
    """
    variant = get_variant(corpus)
    check_dim(variant, dim)
    sha256 = check_sha256(sha256) or variant.sha256
    progress = progress or NullProgress()
    cache = ensure_cache_dir(cache_dir)
    vectors_path, words_path = cache_paths(cache, variant, dim)
    if vectors_path.exists() and not force:
        try:
            rows = load_cache(vectors_path).shape[0]
            return GloveCache(
                variant.corpus, dim, vectors_path, words_path, None, rows, False, False
            )
        except InputError:
            progress.note(f"{vectors_path} is damaged; rebuilding it.")

    downloaded = False
    if from_file is not None:
        archive, owned = Path(from_file).expanduser(), False
        if not archive.is_file():
            raise UsageError(f"--from-file: no such file {archive}.")
        if sha256 and sha256_file(archive) != sha256:
            raise InputError(
                f"{archive} does not match the sha256 {sha256}.",
                hint="Check the file, or the value given to --sha256.",
            )
    else:
        archive, owned = cache / variant.archive, True
        if force:
            remove(archive, partial_path(archive))
        if archive.exists() and sha256 and sha256_file(archive) != sha256:
            progress.note(
                f"{archive.name} in the cache does not match the sha256; downloading it again."
            )
            remove(archive)
        if archive.exists():
            progress.note(f"Using {archive} from the cache; nothing to download.")
        else:
            download(
                url or variant.url,
                archive,
                sha256=sha256,
                expect_zip=True,
                progress=progress,
                timeout=timeout,
                hints=HINTS,
            )
            downloaded = True
    rows = _convert(archive, owned, variant, dim, vectors_path, words_path, progress)
    return GloveCache(
        variant.corpus, dim, vectors_path, words_path, archive, rows, downloaded, True
    )


def _convert(
    archive: Path,
    owned: bool,
    variant: Variant,
    dim: int,
    vectors_path: Path,
    words_path: Path,
    progress: Progress,
) -> int:
    if archive.suffix.lower() != ".zip":  # --from-file given the text itself
        progress.start(f"Converting {archive.name}", archive.stat().st_size)
        with open(archive, "rb") as text:
            blocks = iter_glove_blocks(text, source=str(archive), dim=dim, progress=progress)
            return write_cache(blocks, vectors_path, words_path)
    problem = zip_problem(archive)
    try:
        if problem:
            raise zipfile.BadZipFile(problem)
        with zipfile.ZipFile(archive) as zf:
            info = _variant_member(zf, variant, dim, archive)
            progress.start(f"Converting {info.filename}", info.file_size)
            with zf.open(info) as text:
                blocks = iter_glove_blocks(
                    text, source=f"{archive.name}:{info.filename}", dim=dim, progress=progress
                )
                return write_cache(blocks, vectors_path, words_path)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        if not owned:
            raise InputError(
                f"{archive} is not a valid zip archive ({exc}).",
                hint="Download it again, or drop --from-file to let kdecli download it.",
            ) from None
        remove(archive)
        raise RuntimeFailure(
            f"the archive {archive} is corrupt ({exc}); it was removed.",
            hint="Run again to download it anew.",
        ) from None


def member_dims(names: Iterable[str]) -> dict[int, str]:
    """Text members by the dim their name ends in (``glove.6B.50d.txt`` -> 50), in dim order."""
    found = {}
    for name in names:
        match = re.search(r"(\d+)d\.txt$", name)
        if match:
            found[int(match.group(1))] = name
    return dict(sorted(found.items()))


def _variant_member(
    zf: zipfile.ZipFile, variant: Variant, dim: int, archive: Path
) -> zipfile.ZipInfo:
    want = variant.member(dim)
    for name in zf.namelist():
        if name == want or name.endswith("/" + want):
            return zf.getinfo(name)
    dims = ", ".join(map(str, member_dims(zf.namelist()))) or "none"
    raise InputError(
        f"{archive} holds no {want} for --dim {dim}; the dims it holds: {dims}.",
        hint="Choose one of those with --dim.",
    )
