"""The GloVe binary cache: the Stanford variants, what the cache folder holds, and ``download_glove``,
which fills it (download, extraction of one dim, conversion from text).

The cache folder (``kdecli.download.resolve_cache_dir``) holds::

    glove.6B.zip                 the archive as downloaded (kept: another dim needs no download)
    glove.6B.zip.incomplete      a partial download; the next run resumes it with an HTTP Range
    glove.6B.50d.npy             float32 (rows, 50); loads in milliseconds with mmap
    glove.6B.50d.words.txt       the words, as UTF-8 bytes from the text, one per line, same order
    NAME.sha256                  beside each of those: its SHA-256, as ``sha256sum`` writes it
    .locks/glove.6B.zip.lock     held while the archive is downloaded, checked or read
    .locks/glove.6B.50d.npy.lock held while the 50d cache is checked or built

Every file is written as ``NAME.incomplete`` and moved into place with ``os.replace`` only once it
is whole and verified, so a file under its final name is always complete; the ``.npy`` is moved
last, and its presence marks a finished cache.  The locks (``kdecli.download.cache_lock``, taken
in that order: the dim's, then the archive's) make a second ``download-glove`` wait for the first
and then find the cache ready.  An archive enters the cache only once every member's CRC-32 (or
its known SHA-256) checks out; a conversion that finds it damaged removes it and says so.
Loading checks the size and header of a ``.npy`` every time; ``verify`` (``download-glove
--verify``) checks every file against its digest and rebuilds what fails.
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
    RETRIES,
    Hints,
    NullProgress,
    Progress,
    cache_lock,
    check_sha256,
    check_url,
    digest_line,
    digest_path,
    digest_problem,
    download,
    ensure_cache_dir,
    member_damage,
    partial_path,
    recorded_digest,
    remove,
    sha256_file,
    write_failure,
    write_whole,
    zip_damage,
    zip_problem,
)
from kdecli.errors import InputError, RuntimeFailure, UsageError
from kdecli.sources.glove_text import iter_glove_blocks

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

    Both are written as ``.incomplete`` files and moved into place at the end, the vectors last,
    then their digests (``NAME.sha256``).  On any failure the temporary files are removed and
    nothing under the final names changes.
    """
    tmp_vectors, tmp_words = partial_path(vectors_path), partial_path(words_path)
    pairs = ((words_path, tmp_words), (vectors_path, tmp_vectors))
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
        digests = [(path, sha256_file(tmp)) for path, tmp in pairs]
        remove(*(digest_path(path) for path, _ in digests))  # never an old file's digest
        os.replace(tmp_words, words_path)
        os.replace(tmp_vectors, vectors_path)
        for path, digest in digests:
            write_whole(digest_path(path), digest_line(digest, path))
    except OSError as exc:
        remove(tmp_vectors, tmp_words)
        raise write_failure(exc, vectors_path) from None
    except BaseException:
        remove(tmp_vectors, tmp_words)
        raise
    return rows


REBUILD_HINT = (
    "Check the file; a cache file of `kdecli download-glove` is rebuilt by running it again."
)


def load_cache(path: str | os.PathLike, *, hint: str = REBUILD_HINT) -> np.ndarray:
    """The vectors of a cache file (or any 2-D float .npy), memory-mapped read-only, after the
    cheap checks of ``npy_problem``."""
    path = Path(path)
    problem = npy_problem(path)
    if problem:
        raise InputError(f"{path} cannot be used: {problem}.", hint=hint)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(
            f"{path} cannot be used: it is not a readable .npy array ({exc}).", hint=hint
        ) from None


def npy_problem(path: Path) -> str | None:
    """What the cheap checks, made on every load, find wrong with a .npy file of vectors, or None:
    the header must describe a non-empty 2-D float array, and the file must be as long as the header
    says.  (Its content is checked against its digest only by ``download-glove --verify``: reading
    gigabytes on every load would undo the mmap.)"""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return "the file is empty: 0 bytes"
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # a later version: its header is left to np.load, and the size is not checked
                array = np.load(path, mmap_mode="r", allow_pickle=False)
                shape, dtype = array.shape, array.dtype
            header = f.tell()
    except (OSError, ValueError, EOFError) as exc:
        return f"it is not a readable .npy array ({exc})"
    if len(shape) != 2 or dtype.kind != "f" or shape[0] == 0:
        return (
            f"it holds a {dtype} array of shape {shape}; "
            "GloVe vectors must be a non-empty 2-D float array (rows, dim)"
        )
    expected = header + shape[0] * shape[1] * dtype.itemsize
    if version in ((1, 0), (2, 0)) and size != expected:
        return f"it is {size:,} bytes, and its header says {expected:,}"
    return None


def load_words(vectors_path: str | os.PathLike) -> list[str]:
    """The words that go with a cache file, in row order."""
    path = Path(vectors_path).with_suffix(".words.txt")
    return path.read_bytes().decode("utf-8", "replace").split("\n")[:-1]


# ---------------------------------------------------------------------------------------------
# download-glove


@dataclass(frozen=True)
class GloveCache:
    """Where one variant × dim lives in the cache, and what this call had to do to get it there.
    ``verified``: the files this call found to match their digests (``verify``)."""

    corpus: str
    dim: int
    vectors_path: Path
    words_path: Path
    archive_path: Path | None
    rows: int
    downloaded: bool
    converted: bool
    verified: tuple[Path, ...] = ()


def download_glove(
    corpus: str = "twitter.27B",
    dim: int = 100,
    *,
    cache_dir: str | os.PathLike | None = None,
    url: str | None = None,
    from_file: str | os.PathLike | None = None,
    sha256: str | None = None,
    force: bool = False,
    verify: bool = False,
    progress: Progress | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    retries: int = RETRIES,
) -> GloveCache:
    """Make sure the binary cache of GloVe ``corpus`` at ``dim`` exists; download what is missing.

    Does nothing when the cache is there and passes the cheap checks of ``npy_problem`` (unless
    ``force``); a damaged one is rebuilt.  ``verify`` also checks the cache files, and the archive
    in the cache, against their digests: a file that fails is rebuilt (an archive, removed).  The
    archive comes from ``from_file`` (a .zip, or the glove.*.txt itself; never modified), else the
    archive already in the cache, else ``url`` (default: Stanford's).  ``force`` downloads and
    converts anew; the files in the cache are replaced only once the new ones are whole.  An archive
    in the cache that does not match ``sha256`` stays until a download that matches replaces it.
    """
    variant = get_variant(corpus)
    check_dim(variant, dim)
    job = _Job(
        variant=variant,
        dim=dim,
        url=check_url(url) if url is not None else variant.url,
        from_file=Path(from_file).expanduser() if from_file is not None else None,
        sha256=check_sha256(sha256) or variant.sha256,
        force=force,
        verify=verify,
        progress=progress or NullProgress(),
        timeout=timeout,
        retries=retries,
        cache=ensure_cache_dir(cache_dir),
    )
    if not force and not verify:  # the common case, without a lock: a finished cache is read-only
        rows = _cached_rows(job.vectors_path, job.words_path, NullProgress())
        if rows is not None:
            return job.result(rows)
    with cache_lock(job.vectors_path, job.progress):
        return job.run()


@dataclass(frozen=True)
class _Job:
    """One ``download_glove`` call, its arguments checked; ``run`` does it."""

    variant: Variant
    dim: int
    url: str
    from_file: Path | None
    sha256: str | None
    force: bool
    verify: bool
    progress: Progress
    timeout: float
    retries: int
    cache: Path

    @property
    def vectors_path(self) -> Path:
        return cache_paths(self.cache, self.variant, self.dim)[0]

    @property
    def words_path(self) -> Path:
        return cache_paths(self.cache, self.variant, self.dim)[1]

    @property
    def archive(self) -> Path:
        """The archive in the cache (``from_file`` is never copied there)."""
        return self.cache / self.variant.archive

    def result(self, rows: int, archive: Path | None = None, **done) -> GloveCache:
        done = {"downloaded": False, "converted": False} | done
        paths = (self.vectors_path, self.words_path)
        return GloveCache(self.variant.corpus, self.dim, *paths, archive, rows, **done)

    def run(self) -> GloveCache:
        """Once this dim's lock is held: check, then build what is missing or damaged."""
        progress, verified = self.progress, ()
        rows = None if self.force else _cached_rows(self.vectors_path, self.words_path, progress)
        if rows is not None and self.verify:
            verified = _verify_files((self.vectors_path, self.words_path), progress)
            rows = rows if len(verified) == 2 else None
        if self.from_file is not None:
            if rows is not None:
                return self.result(rows, verified=verified)
            rows = self.convert_from_file()
            return self.result(rows, self.from_file, converted=True, verified=verified)
        if rows is not None and not self.verify:
            return self.result(rows)
        with cache_lock(self.archive, progress):
            if self.verify:
                verified += _verify_archive(self.archive, progress)
            if rows is not None:
                return self.result(rows, verified=verified)
            downloaded = self.fetch_archive()
            rows = _convert(self.archive, True, self, progress)
            return self.result(
                rows, self.archive, downloaded=downloaded, converted=True, verified=verified
            )

    def convert_from_file(self) -> int:
        archive = self.from_file
        if not archive.is_file():
            raise UsageError(f"--from-file: no such file {archive}.")
        if self.sha256 and sha256_file(archive) != self.sha256:
            raise InputError(
                f"{archive} does not match the sha256 {self.sha256}.",
                hint="Check the file, or the value given to --sha256.",
            )
        return _convert(archive, False, self, self.progress)

    def fetch_archive(self) -> bool:
        """Whether the archive had to be downloaded to be in the cache; its lock is held."""
        archive, progress = self.archive, self.progress
        if self.force:
            remove(partial_path(archive))  # a fresh download; the archive stays until replaced
        elif archive.exists():
            known = recorded_digest(archive) if self.sha256 else None
            if not self.sha256 or (known or sha256_file(archive)) == self.sha256:
                progress.note(f"Using {archive} from the cache; nothing to download.")
                return False
            progress.note(
                f"{archive.name} in the cache does not match the sha256; downloading it again "
                "(the cached copy stays unless the download matches)."
            )
        download(
            self.url,
            archive,
            sha256=self.sha256,
            expect_zip=True,
            progress=progress,
            timeout=self.timeout,
            hints=HINTS,
            retries=self.retries,
        )
        return True


def _cached_rows(vectors_path: Path, words_path: Path, progress: Progress) -> int | None:
    """The row count of a finished cache that passes the cheap checks, else None (a damaged one
    is named through ``progress``)."""
    if not vectors_path.exists():
        return None
    problem = npy_problem(vectors_path)
    if problem is None and (not words_path.is_file() or words_path.stat().st_size == 0):
        problem = f"{words_path.name} is missing or empty"
    if problem:
        progress.note(f"{vectors_path} is damaged: {problem}; rebuilding it.")
        return None
    return load_cache(vectors_path).shape[0]


def _verify_files(paths: Iterable[Path], progress: Progress) -> tuple[Path, ...]:
    """The files that match the digests written with them; each one that does not is named."""
    good = []
    for path in paths:
        problem = digest_problem(path)
        if problem:
            progress.note(f"{path} {problem}; rebuilding it.")
        else:
            good.append(path)
    if good:
        names = " and ".join(p.name for p in good)
        progress.note(f"Verified {names}: the SHA-256 matches the digest written with it.")
    return tuple(good)


def _verify_archive(archive: Path, progress: Progress) -> tuple[Path, ...]:
    """Check the archive in the cache, if there is one, against its digest (an archive without
    one: every member's CRC-32, and its digest is recorded); a damaged archive is removed."""
    if not archive.exists():
        return ()
    if recorded_digest(archive) is None:
        damage = zip_problem(archive) or zip_damage(archive)
        if not damage:
            write_whole(digest_path(archive), digest_line(sha256_file(archive), archive))
            progress.note(f"Verified {archive.name}: every member's CRC-32; digest recorded.")
            return (archive,)
    else:
        damage = digest_problem(archive)
        if not damage:
            progress.note(
                f"Verified {archive.name}: the SHA-256 matches the digest written with it."
            )
            return (archive,)
    remove(archive, digest_path(archive))
    progress.note(f"{archive} is damaged ({damage}); it was removed.")
    return ()


def _convert(archive: Path, owned: bool, job: _Job, progress: Progress) -> int:
    """Build the cache of ``job`` from a zip or a text.  A zip whose member fails to read, or fails
    to parse where its CRC-32 is wrong, is damaged: in the cache (``owned``) it is removed, and
    either way the message says so."""
    dim, vectors_path, words_path = job.dim, job.vectors_path, job.words_path
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
            info = _variant_member(zf, job.variant, dim, archive)
            progress.start(f"Converting {info.filename}", info.file_size)
            try:
                with zf.open(info) as text:
                    source = f"{archive.name}:{info.filename}"
                    blocks = iter_glove_blocks(text, source=source, dim=dim, progress=progress)
                    return write_cache(blocks, vectors_path, words_path)
            except InputError as exc:  # a parse error may be the first sign of damage
                damage = member_damage(zf, info)
                if damage is None:
                    raise
                raise zipfile.BadZipFile(f"{damage}; parsing had stopped: {exc.message}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        if not owned:
            raise InputError(
                f"{archive} is not a valid zip archive ({exc}).",
                hint="Download it again, or drop --from-file to let kdecli download it.",
            ) from None
        remove(archive, digest_path(archive))
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
