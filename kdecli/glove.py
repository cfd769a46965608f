"""GloVe: the Stanford variants, a resumable download, streaming extraction, a binary cache, and
the KDEformer paper's Q/K/V protocol.

The cache folder is ``cache_dir`` if given, else ``$KDECLI_CACHE_DIR``, else
``$XDG_CACHE_HOME/kdecli`` or ``~/.cache/kdecli``.  It holds::

    glove.6B.zip                 the archive as downloaded (kept: another dim needs no download)
    glove.6B.zip.incomplete      a partial download; the next run resumes it with an HTTP Range
    glove.6B.50d.npy             float32 (rows, 50); loads in milliseconds with mmap
    glove.6B.50d.words.txt       the words, as UTF-8 bytes from the text, one per line, same order

Every file is written as ``NAME.incomplete`` and moved into place with ``os.replace`` only once it
is whole and verified, so a file under its final name is always complete; the ``.npy`` is moved
last, and its presence marks a finished cache.

The paper's protocol (``demo_glove.py`` of the KDEformer reference code): with b = 8 and L = 16384,

    Q = rows[0 : bL].reshape(b, L, d)[:, :n]       K = Q
    V = rows[2bL : 3bL].reshape(b, L, d)[:, :n]    softmax scale 10**-0.5

(the reference divides Q and K by 10**0.25 each and applies no other scale), one head, so Q, K, V
are ``(b, 1, n, d)``.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import io
import os
import re
import struct
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import torch

from kdecli.errors import InputError, RuntimeFailure, UsageError

GLOVE_SCALE = 10**-0.5
DEFAULT_BATCH = 8
DEFAULT_MAX_LEN = 16384
DEFAULT_TIMEOUT_S = 30.0
CHUNK_BYTES = 1 << 20  # download read size
PARSE_CHUNK_BYTES = 4 << 20  # text parsed per block
NETWORK_HINT = (
    "Check the network connection, or use --url to point at a mirror, or --from-file at an "
    "archive already on disk."
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
        did_you = f" Did you mean `{names[[n.lower() for n in names].index(close[0])]}`?" if close else ""
        raise UsageError(f"unknown GloVe corpus `{corpus}`.{did_you}", hint="Choose one of " + ", ".join(names) + ".")
    return found


def check_dim(variant: Variant, dim: int) -> int:
    if dim not in variant.dims:
        dims = ", ".join(map(str, variant.dims))
        raise UsageError(f"GloVe {variant.short_name} comes in dims {dims}; got --dim {dim}.")
    return dim


# ---------------------------------------------------------------------------------------------
# Cache folder and file names


def default_cache_dir() -> Path:
    env = os.environ.get("KDECLI_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "kdecli"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def ensure_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    path = resolve_cache_dir(cache_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot create the cache folder {path}: {exc.strerror or exc}.",
            hint="Choose a writable folder with --cache-dir or KDECLI_CACHE_DIR.",
        ) from None
    return path


def cache_paths(cache_dir: Path, variant: Variant, dim: int) -> tuple[Path, Path]:
    """(vectors .npy, words .txt) for one variant and dim inside ``cache_dir``."""
    stem = variant.stem(dim)
    return cache_dir / f"{stem}.npy", cache_dir / f"{stem}.words.txt"


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".incomplete")


def _write_failure(exc: OSError, path: Path, *, kept: bool = False) -> RuntimeFailure:
    again = "run again to resume" if kept else "run again"
    if exc.errno == errno.ENOSPC:
        return RuntimeFailure(
            f"no space left on the device while writing {path}.",
            hint=f"Free some space and {again}, or choose another folder with --cache-dir.",
        )
    return RuntimeFailure(
        f"cannot write {path}: {exc.strerror or exc}.",
        hint="Choose a writable folder with --cache-dir or KDECLI_CACHE_DIR.",
    )


def _remove(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# Progress


class Progress(Protocol):
    """What the library reports while it works; the CLI draws it as a rich bar.

    ``start`` begins a phase measured in bytes (``total`` None: size unknown, an indeterminate
    bar); ``advance`` adds bytes done; ``note`` is a one-line message for the person.
    """

    def start(self, description: str, total: int | None, completed: int = 0) -> None: ...

    def advance(self, amount: int) -> None: ...

    def note(self, message: str) -> None: ...


class NullProgress:
    def start(self, description: str, total: int | None, completed: int = 0) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def note(self, message: str) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Download


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    progress: Progress | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.incomplete``, resuming a partial file.

    Resumes with an HTTP Range request; a server that answers 200 instead of 206 gets a clean
    restart.  Verified before the move into place: size against Content-Length, the zip's central
    directory and member extents, and ``sha256`` when given.  A transfer that breaks off (or a
    KeyboardInterrupt) keeps the partial file for the next run; a complete but bad file is removed.
    """
    dest, progress = Path(dest), progress or NullProgress()
    part = partial_path(dest)
    _fetch(url, part, progress, timeout)  # checks the size against Content-Length itself
    problem = zip_problem(part)
    if problem:
        _remove(part)
        raise RuntimeFailure(
            f"the file downloaded from {url} is not a valid zip archive ({problem}); it was removed.",
            hint="Run again to download it anew; if this repeats, check that --url points at a GloVe archive.",
        )
    if sha256:
        actual = sha256_file(part)
        if actual != sha256.lower():
            _remove(part)
            raise RuntimeFailure(
                f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, got {actual}; "
                "the file was removed.",
                hint="Run again to download it anew, or check the value given to --sha256.",
            )
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, progress: Progress, timeout: float) -> int | None:
    """Fill ``part`` with the whole body of ``url``; return the size the server announced."""
    for _ in range(2):  # a second round only after a stale partial file was dropped
        offset = part.stat().st_size if part.exists() else 0
        try:
            headers = {"User-Agent": "kdecli"} | ({"Range": f"bytes={offset}-"} if offset else {})
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                if exc.code == 416 and offset:
                    total = _content_range(exc.headers.get("Content-Range", ""))[1]
                    if total == offset:
                        return total  # the partial file already holds everything
                    progress.note(f"The partial file {part.name} does not match the server's; starting over.")
                    _remove(part)
                    continue
            raise RuntimeFailure(f"downloading {url} failed: HTTP {exc.code} {exc.reason}.", hint=NETWORK_HINT) from None
        except urllib.error.URLError as exc:
            raise RuntimeFailure(f"cannot reach {url}: {exc.reason}.", hint=NETWORK_HINT) from None
        except ValueError:
            raise UsageError(f"cannot download from `{url}`: give an http:// or https:// address.") from None
        except (OSError, http.client.HTTPException) as exc:
            raise RuntimeFailure(f"cannot reach {url}: {exc}.", hint=NETWORK_HINT) from None
        with response:
            return _receive(response, url, part, offset, progress)
    raise RuntimeFailure(f"the server at {url} keeps refusing to resume {part.name}.", hint=NETWORK_HINT)


def _receive(response, url: str, part: Path, offset: int, progress: Progress) -> int | None:
    length = response.headers.get("Content-Length", "")
    total = int(length) if length.isdigit() else None
    if offset and response.status == 206:
        start, whole = _content_range(response.headers.get("Content-Range", ""))
        total = whole if whole is not None else (offset + total if total is not None else None)
        if start != offset:
            _remove(part)
            raise RuntimeFailure(f"the server sent bytes from {start}, not {offset}, of {url}; "
                                 "the partial file was removed.", hint="Run again to download from the start.")
        mode = "ab"
    else:
        if offset:
            progress.note("The server does not resume downloads; starting over.")
        offset, mode = 0, "wb"
    if offset:
        progress.note(f"Resuming {part.name} at {offset / 2**20:,.1f} MiB.")
    progress.start(f"Downloading {part.name.removesuffix('.incomplete')}", total, completed=offset)
    received, broken = offset, None
    try:
        with open(part, mode) as out:
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as exc:
                    broken = exc
                    break
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
                progress.advance(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise _write_failure(exc, part, kept=True) from None
    if broken is not None or (total is not None and received < total):
        got = f"{received:,} of {total:,} bytes" if total is not None else f"{received:,} bytes"
        why = f" ({type(broken).__name__})" if broken is not None else ""
        raise RuntimeFailure(f"the download of {url} broke off after {got}{why}.",
                             hint=f"Run the same command again to resume; {part} is kept.")
    if total is not None and received > total:
        _remove(part)
        raise RuntimeFailure(f"{url} sent {received:,} bytes, more than the {total:,} it announced; "
                             "the file was removed.", hint="Run again to download it anew.")
    return total


def _content_range(value: str) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``bytes a-b/total`` or ``bytes */total``."""
    match = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value)
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def zip_problem(path: Path) -> str | None:
    """What is wrong with a zip file's structure, or None.  Member CRCs are checked on extraction."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"{info.filename} runs past the end of the file"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as exc:
        return str(exc) or type(exc).__name__
    return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES * 4):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(value: str | None) -> str | None:
    if value is None:
        return None
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value.strip()):
        raise UsageError(f"`--sha256` must be 64 hexadecimal digits; got {value!r}.")
    return value.strip().lower()


# ---------------------------------------------------------------------------------------------
# Parsing the text format: "word x1 x2 ... xd" per line


def iter_glove_blocks(
    stream: BinaryIO,
    *,
    source: str,
    dim: int | None = None,
    max_rows: int | None = None,
    progress: Progress | None = None,
) -> Iterator[tuple[list[bytes], np.ndarray]]:
    """Yield (words, float32 vectors) blocks from a GloVe text stream, a few MB at a time.

    Each block goes through ``np.loadtxt`` (C speed, about 5x a float() per token) when every line
    has exactly ``dim`` spaces; other blocks (words with spaces, as in glove.840B, or odd spacing)
    are split line by line from the right.  ``dim`` None: taken from the first line.  A first line
    ``<rows> <dim>`` (word2vec text header) is skipped.
    """
    progress = progress or NullProgress()
    tail, line_no, rows, first = b"", 1, 0, True
    while True:
        chunk = stream.read(PARSE_CHUNK_BYTES)
        progress.advance(len(chunk))
        data = tail + chunk
        if chunk:
            cut = data.rfind(b"\n")
            if cut < 0:
                tail = data
                continue
            data, tail = data[:cut], data[cut + 1 :]
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").removesuffix(b"\r")
        if data:
            lines = data.split(b"\n")
            if first:
                first = False
                head = lines[0].split()
                if len(head) == 2 and head[0].isdigit() and head[1].isdigit():
                    dim = dim or int(head[1])
                    data, lines, line_no = data[len(lines[0]) + 1 :], lines[1:], 2
                if dim is None:
                    dim = len(head) - 1
                    if dim < 1:
                        raise InputError(f"{source}: line 1 is not `word x1 x2 ...`; is this a GloVe text file?")
            if lines:
                words, block = _parse_lines(lines, data, dim, source, line_no)
                if max_rows is not None and rows + len(words) >= max_rows:
                    keep = max_rows - rows
                    yield words[:keep], block[:keep]
                    return
                rows += len(words)
                line_no += len(lines)
                yield words, block
        if not chunk:
            return


def _parse_lines(lines: list[bytes], data: bytes, dim: int, source: str, line_no: int):
    if b"" not in lines and data.count(b" ") == len(lines) * dim:
        try:
            block = np.loadtxt(io.BytesIO(data), dtype=np.float32, usecols=range(1, dim + 1), delimiter=" ",
                               comments=None, quotechar=None, encoding="latin-1", ndmin=2)
        except ValueError:
            block = None
        if block is not None and block.shape == (len(lines), dim):
            words = [line.partition(b" ")[0] for line in lines]
            return words, _finite(block, source, line_no, list(range(len(lines))))
    words, rows, kept = [], [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        # From the right: the word itself may hold spaces (glove.840B) or be a blank character.
        parts = line.rsplit(b" ", dim)
        if len(parts) != dim + 1 or b"" in parts[1:]:
            parts = line.rsplit(None, dim)
        try:
            if len(parts) != dim + 1 or _numeric_tail(parts[0]):
                raise ValueError
            rows.append(np.array(parts[1:], dtype=np.float32))
        except ValueError:
            found = len(line.split()) - 1
            raise InputError(f"{source}, line {line_no + i}: expected a word and {dim} numbers; "
                             f"found a word and {found} fields.") from None
        words.append(parts[0])
        kept.append(i)
    block = np.stack(rows) if rows else np.empty((0, dim), np.float32)
    return words, _finite(block, source, line_no, kept)


def _numeric_tail(word: bytes) -> bool:
    """A "word" like ``w 0.1 0.2``: the line has more numbers than ``dim``, not a word with spaces."""
    tail = word.split()[1:]
    try:
        return bool(tail) and all(np.isfinite(float(t)) for t in tail)
    except ValueError:
        return False


def _finite(block: np.ndarray, source: str, line_no: int, line_offsets: list[int]) -> np.ndarray:
    ok = np.isfinite(block).all(axis=1)
    if not ok.all():
        bad = line_no + line_offsets[int(np.argmin(ok))]
        raise InputError(f"{source}, line {bad}: a value is not a finite number.")
    return block


def parse_glove_text(
    stream: BinaryIO, *, source: str, dim: int | None = None, max_rows: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """All vectors (float32, rows × dim) and words of a GloVe text stream, in memory."""
    words: list[bytes] = []
    blocks: list[np.ndarray] = []
    for w, block in iter_glove_blocks(stream, source=source, dim=dim, max_rows=max_rows):
        words += w
        blocks.append(block)
    if not words:
        raise InputError(f"{source} holds no vectors.")
    return np.concatenate(blocks), [w.decode("utf-8", "replace") for w in words]


# ---------------------------------------------------------------------------------------------
# The binary cache

_NPY_HEADER_BYTES = 128


def _npy_header(rows: int, dim: int) -> bytes:
    """A .npy v1.0 header for float32 (rows, dim), always 128 bytes so it can be rewritten in place."""
    body = repr({"descr": "<f4", "fortran_order": False, "shape": (rows, dim)}).encode("latin-1")
    pad = _NPY_HEADER_BYTES - 10 - len(body) - 1
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", _NPY_HEADER_BYTES - 10) + body + b" " * pad + b"\n"


def write_cache(blocks: Iterable[tuple[list[bytes], np.ndarray]], vectors_path: Path, words_path: Path) -> int:
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
        _remove(tmp_vectors, tmp_words)
        raise _write_failure(exc, vectors_path) from None
    except BaseException:
        _remove(tmp_vectors, tmp_words)
        raise
    return rows


def load_cache(path: str | os.PathLike) -> np.ndarray:
    """The vectors of a cache file (or any 2-D float .npy), memory-mapped read-only."""
    path = Path(path)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable .npy array ({exc}).",
                         hint="Delete it and run `kdecli download-glove` again (or pass --force).") from None
    if array.ndim != 2 or array.dtype.kind != "f" or array.shape[0] == 0:
        raise InputError(f"{path} holds a {array.dtype} array of shape {array.shape}; "
                         "GloVe vectors must be a non-empty 2-D float array (rows, dim).")
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
    sha256 = _check_sha256(sha256) or variant.sha256
    progress = progress or NullProgress()
    cache = ensure_cache_dir(cache_dir)
    vectors_path, words_path = cache_paths(cache, variant, dim)
    if vectors_path.exists() and not force:
        try:
            rows = load_cache(vectors_path).shape[0]
            return GloveCache(variant.corpus, dim, vectors_path, words_path, None, rows, False, False)
        except InputError:
            progress.note(f"{vectors_path} is damaged; rebuilding it.")

    downloaded = False
    if from_file is not None:
        archive, owned = Path(from_file).expanduser(), False
        if not archive.is_file():
            raise UsageError(f"--from-file: no such file {archive}.")
        if sha256 and sha256_file(archive) != sha256:
            raise InputError(f"{archive} does not match the sha256 {sha256}.",
                             hint="Check the file, or the value given to --sha256.")
    else:
        archive, owned = cache / variant.archive, True
        if force:
            _remove(archive, partial_path(archive))
        if archive.exists() and sha256 and sha256_file(archive) != sha256:
            progress.note(f"{archive.name} in the cache does not match the sha256; downloading it again.")
            _remove(archive)
        if archive.exists():
            progress.note(f"Using {archive} from the cache; nothing to download.")
        else:
            download(url or variant.url, archive, sha256=sha256, progress=progress, timeout=timeout)
            downloaded = True
    rows = _convert(archive, owned, variant, dim, vectors_path, words_path, progress)
    return GloveCache(variant.corpus, dim, vectors_path, words_path, archive, rows, downloaded, True)


def _convert(archive: Path, owned: bool, variant: Variant, dim: int, vectors_path: Path,
             words_path: Path, progress: Progress) -> int:
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
                blocks = iter_glove_blocks(text, source=f"{archive.name}:{info.filename}", dim=dim, progress=progress)
                return write_cache(blocks, vectors_path, words_path)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        if not owned:
            raise InputError(f"{archive} is not a valid zip archive ({exc}).",
                             hint="Download it again, or drop --from-file to let kdecli download it.") from None
        _remove(archive)
        raise RuntimeFailure(f"the archive {archive} is corrupt ({exc}); it was removed.",
                             hint="Run again to download it anew.") from None


def _member_dims(names: Iterable[str]) -> dict[int, str]:
    found = {}
    for name in names:
        match = re.search(r"(\d+)d\.txt$", name)
        if match:
            found[int(match.group(1))] = name
    return dict(sorted(found.items()))


def _variant_member(zf: zipfile.ZipFile, variant: Variant, dim: int, archive: Path) -> zipfile.ZipInfo:
    want = variant.member(dim)
    for name in zf.namelist():
        if name == want or name.endswith("/" + want):
            return zf.getinfo(name)
    dims = ", ".join(map(str, _member_dims(zf.namelist()))) or "none"
    raise InputError(f"{archive} holds no {want} for --dim {dim}; the dims it holds: {dims}.",
                     hint="Choose one of those with --dim.")


# ---------------------------------------------------------------------------------------------
# INPUT `glove:...` and the paper's protocol


def glove_qkv(
    vectors: np.ndarray, n: int | None = None, batch: int = DEFAULT_BATCH, max_len: int = DEFAULT_MAX_LEN
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V of shape (batch, 1, n, d) from GloVe rows by the paper's protocol (module docstring)."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise InputError(f"GloVe vectors must be a 2-D array (rows, dim); got shape {vectors.shape}.")
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
        return torch.from_numpy(np.array(part, dtype=np.result_type(part.dtype, np.float32))).unsqueeze(1)

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


def _resolve(spec: str, cache_dir, max_rows: int | None) -> tuple[np.ndarray, str]:
    text = spec.removeprefix("glove:").strip()
    if not text:
        raise UsageError("`glove:` needs a file or a name, e.g. glove:6B.50d or glove:/data/glove.6B.50d.txt.")
    pick = None
    head, sep, frag = text.rpartition("#")
    if sep and head.lower().endswith(".zip"):
        text, pick = head, frag.lower().removesuffix("d")
        if not pick.isdigit():
            raise UsageError(f"`glove:{text}#{frag}`: the part after # must be a dim such as 50; got {frag!r}.")
    path = Path(text).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npy":
            array = load_cache(path)
            return (array if max_rows is None else array[:max_rows]), f"glove:{path} ({array.shape[0]:,} × {array.shape[1]})"
        if suffix == ".zip":
            return _from_zip(path, pick, max_rows)
        with open(path, "rb") as stream:
            array = parse_glove_text(stream, source=str(path), max_rows=max_rows)[0]
        return array, f"glove:{path} (text, {array.shape[0]:,} rows of width {array.shape[1]} read)"
    if path.exists():
        raise InputError(f"`glove:{text}`: {path} is not a file; give a glove.*.txt, its .zip or a .npy cache.")
    match = _NAME.fullmatch(text)
    variant = None
    if match and not re.search(r"\.(txt|zip|npy)$", text, re.IGNORECASE):
        try:
            variant = get_variant(match["corpus"])
        except UsageError:
            pass
    if variant is None:
        raise InputError(f"`glove:{text}`: no such file {path}, and no GloVe corpus of that name.",
                         hint="glove: takes a glove.*.txt, its .zip, a .npy cache, or a cached name such as "
                         "6B.50d or twitter.27B.100d.")
    if match["dim"] is None and len(variant.dims) > 1:
        dims = ", ".join(f"glove:{variant.short_name}.{d}d" for d in variant.dims)
        raise UsageError(f"`glove:{text}` needs a dim: {dims}.")
    dim = check_dim(variant, int(match["dim"] or variant.dims[0]))
    cache = resolve_cache_dir(cache_dir)
    vectors_path = cache_paths(cache, variant, dim)[0]
    if not vectors_path.exists():
        raise UsageError(f"GloVe {variant.short_name} {dim}d is not in the cache folder {cache}.",
                         hint=f"Run `kdecli download-glove --corpus {variant.short_name} --dim {dim}` first.")
    array = load_cache(vectors_path)
    return (array if max_rows is None else array[:max_rows]), f"glove:{variant.stem(dim)} ({vectors_path})"


def _from_zip(path: Path, pick: str | None, max_rows: int | None) -> tuple[np.ndarray, str]:
    problem = zip_problem(path)
    if problem:
        raise InputError(f"{path} is not a valid zip archive ({problem}).")
    with zipfile.ZipFile(path) as zf:
        texts = [name for name in zf.namelist() if name.lower().endswith(".txt")]
        by_dim = _member_dims(texts)
        if pick is not None:
            if int(pick) not in by_dim:
                dims = ", ".join(map(str, by_dim)) or "none"
                raise InputError(f"{path} holds no member for dim {pick}; the dims it holds: {dims}.")
            member = by_dim[int(pick)]
        elif len(texts) == 1:
            member = texts[0]
        else:
            choices = ", ".join(f"glove:{path}#{d}" for d in by_dim) or "none"
            raise UsageError(f"{path} holds {len(texts)} text members ({', '.join(texts) or 'none'}); "
                             f"pick one by dim: {choices}.")
        try:
            with zf.open(member) as stream:
                array = parse_glove_text(stream, source=f"{path}:{member}", max_rows=max_rows)[0]
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise InputError(f"{path} is corrupt ({exc}).") from None
    return array, f"glove:{path}:{member} ({array.shape[0]:,} rows of width {array.shape[1]} read)"


def load_glove_input(
    spec: str,
    n: int | None = None,
    batch: int = DEFAULT_BATCH,
    cache_dir: str | os.PathLike | None = None,
    *,
    max_len: int = DEFAULT_MAX_LEN,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, str]:
    """(q, k, v, default scale, source) for the INPUT ``glove:SPEC`` by the paper's protocol.

    An ``n`` above ``max_len`` lengthens the blocks to ``n`` (the layout stays that of the paper).
    Only the first 3·batch·max_len rows of a text are parsed.
    """
    if isinstance(n, (int, np.integer)) and n > max_len:
        max_len = int(n)
    need = 3 * batch * max_len if isinstance(batch, int) and batch > 0 else None
    vectors, described = _resolve(spec, cache_dir, need)
    q, k, v = glove_qkv(vectors, n, batch, max_len)
    source = f"{described}; paper protocol: batch {batch}, n {q.shape[2]}, blocks of {max_len} rows"
    return q, k, v, GLOVE_SCALE, source
