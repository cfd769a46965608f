"""Downloads into kdecli's cache folder: resumable, verified, with progress.  Any source may use it.

The cache folder is ``cache_dir`` if given, else ``$KDECLI_CACHE_DIR``, else
``$XDG_CACHE_HOME/kdecli`` or ``~/.cache/kdecli``.

Every file is written as ``NAME.incomplete`` in its destination folder and moved into place with
``os.replace`` only once it is whole and verified, so a file under its final name is always
complete.  An interrupted transfer keeps ``NAME.incomplete``; the next run resumes it with an HTTP
Range request.  ``Progress`` is how the library reports bytes and notes while it works; the CLI
draws it as a rich bar on stderr, ``NullProgress`` draws nothing.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kdecli.errors import RuntimeFailure, UsageError

DEFAULT_TIMEOUT_S = 30.0
CHUNK_BYTES = 1 << 20  # read size of a transfer


@dataclass(frozen=True)
class Hints:
    """What to tell the person when a download fails: the server cannot be reached (``network``),
    or what came is not the zip archive that was expected (``not_zip``)."""

    network: str = "Check the network connection, or download from a mirror."
    not_zip: str = "Run again to download it anew; if this repeats, check the address."


# ---------------------------------------------------------------------------------------------
# Cache folder


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


def partial_path(path: Path) -> Path:
    """Where ``path`` is written until it is complete: ``NAME.incomplete`` beside it."""
    return path.with_name(path.name + ".incomplete")


def write_failure(exc: OSError, path: Path, *, kept: bool = False) -> RuntimeFailure:
    """The error for a failed write of ``path``: a full disk, or a folder that cannot be written."""
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


def remove(*paths: Path) -> None:
    """Delete files if they are there; a file that cannot be deleted is left alone."""
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
    expect_zip: bool = False,
    progress: Progress | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    hints: Hints = Hints(),
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.incomplete``, resuming a partial file.

    Resumes with an HTTP Range request; a server that answers 200 instead of 206 gets a clean
    restart.  Verified before the move into place: size against Content-Length, the zip's central
    directory and member extents when ``expect_zip``, and ``sha256`` when given.  A transfer that
    breaks off (or a KeyboardInterrupt) keeps the partial file for the next run; a complete but bad
    file is removed.
    """
    dest, progress = Path(dest), progress or NullProgress()
    part = partial_path(dest)
    _fetch(url, part, progress, timeout, hints)  # checks the size against Content-Length itself
    problem = zip_problem(part) if expect_zip else None
    if problem:
        remove(part)
        raise RuntimeFailure(
            f"the file downloaded from {url} is not a valid zip archive ({problem}); it was removed.",
            hint=hints.not_zip,
        )
    if sha256:
        actual = sha256_file(part)
        if actual != sha256.lower():
            remove(part)
            raise RuntimeFailure(
                f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, got {actual}; "
                "the file was removed.",
                hint="Run again to download it anew, or check the value given to --sha256.",
            )
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, progress: Progress, timeout: float, hints: Hints) -> int | None:
    """Fill ``part`` with the whole body of ``url``; return the size the server announced."""
    for _ in range(2):  # a second round only after a stale partial file was dropped
        offset = part.stat().st_size if part.exists() else 0
        try:
            headers = {"User-Agent": "kdecli"} | ({"Range": f"bytes={offset}-"} if offset else {})
            response = urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=timeout
            )
        except urllib.error.HTTPError as exc:
            with exc:
                if exc.code == 416 and offset:
                    total = _content_range(exc.headers.get("Content-Range", ""))[1]
                    if total == offset:
                        return total  # the partial file already holds everything
                    progress.note(
                        f"The partial file {part.name} does not match the server's; starting over."
                    )
                    remove(part)
                    continue
            raise RuntimeFailure(
                f"downloading {url} failed: HTTP {exc.code} {exc.reason}.", hint=hints.network
            ) from None
        except urllib.error.URLError as exc:
            raise RuntimeFailure(f"cannot reach {url}: {exc.reason}.", hint=hints.network) from None
        except ValueError:
            raise UsageError(
                f"cannot download from `{url}`: give an http:// or https:// address."
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise RuntimeFailure(f"cannot reach {url}: {exc}.", hint=hints.network) from None
        with response:
            return _receive(response, url, part, offset, progress)
    raise RuntimeFailure(
        f"the server at {url} keeps refusing to resume {part.name}.", hint=hints.network
    )


def _receive(response, url: str, part: Path, offset: int, progress: Progress) -> int | None:
    length = response.headers.get("Content-Length", "")
    total = int(length) if length.isdigit() else None
    if offset and response.status == 206:
        start, whole = _content_range(response.headers.get("Content-Range", ""))
        total = whole if whole is not None else (offset + total if total is not None else None)
        if start != offset:
            remove(part)
            raise RuntimeFailure(
                f"the server sent bytes from {start}, not {offset}, of {url}; "
                "the partial file was removed.",
                hint="Run again to download from the start.",
            )
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
        raise write_failure(exc, part, kept=True) from None
    if broken is not None or (total is not None and received < total):
        got = f"{received:,} of {total:,} bytes" if total is not None else f"{received:,} bytes"
        why = f" ({type(broken).__name__})" if broken is not None else ""
        raise RuntimeFailure(
            f"the download of {url} broke off after {got}{why}.",
            hint=f"Run the same command again to resume; {part} is kept.",
        )
    if total is not None and received > total:
        remove(part)
        raise RuntimeFailure(
            f"{url} sent {received:,} bytes, more than the {total:,} it announced; "
            "the file was removed.",
            hint="Run again to download it anew.",
        )
    return total


def _content_range(value: str) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``bytes a-b/total`` or ``bytes */total``."""
    match = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value)
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


# ---------------------------------------------------------------------------------------------
# Verification


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


def check_sha256(value: str | None) -> str | None:
    """A ``--sha256`` value, lower-cased; anything but 64 hex digits is a usage error."""
    if value is None:
        return None
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value.strip()):
        raise UsageError(f"`--sha256` must be 64 hexadecimal digits; got {value!r}.")
    return value.strip().lower()
