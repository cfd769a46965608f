"""Downloads into kdecli's cache folder: locked, resumable, retried, verified, with progress.
Any source may use it.

The cache folder is ``cache_dir`` if given, else ``$KDECLI_CACHE_DIR``, else
``$XDG_CACHE_HOME/kdecli`` or ``~/.cache/kdecli``.

- Written whole or not at all: every file is written as ``NAME.incomplete`` in its destination
  folder and moved into place with ``os.replace`` only once it is whole and verified, so a file
  under its final name is always complete, and a failed run leaves the previous one as it was.
- Locked: ``cache_lock(NAME)`` holds ``.locks/NAME.lock`` in its folder (``filelock``; the
  operating system drops the lock of a process that dies; the empty lock files stay, as they must
  for the lock to be safe).  A second process waits, then finds the file ready.
- Resumed and retried: a transfer that breaks off keeps ``NAME.incomplete``, and is resumed with
  an HTTP Range request.  A transient failure (the connection cut, reset or timed out; HTTP 408,
  429, 500, 502, 503, 504) is retried ``RETRIES`` (5) times with back-off, ``BACKOFF_S`` doubling:
  1, 2, 4, 8, 16 s.  The count starts again whenever a try brings new bytes, so a connection cut
  every megabyte still finishes; after that many tries in a row that got no further, the partial
  file is kept for the next run.
- Verified: the size against Content-Length; a zip archive's structure, then every member's CRC-32
  (or, when the SHA-256 is known, the digest).
- With a digest: ``NAME.sha256`` beside the file, in the format of ``sha256sum`` (``<64 hex
  digits>  NAME``), so ``sha256sum -c NAME.sha256`` checks it too; ``digest_problem`` checks it.

``Progress`` is how the library reports bytes and notes while it works; the CLI draws it as a rich
bar on stderr, ``NullProgress`` draws nothing.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from filelock import FileLock, Timeout

from kdecli.errors import RuntimeFailure, UsageError

DEFAULT_TIMEOUT_S = 30.0
CHUNK_BYTES = 1 << 20  # read size of a transfer
RETRIES = 5  # tries in a row that get no further, after the first, before a download gives up
BACKOFF_S = 1.0  # the wait before the first retry; it doubles for each one after
RETRY_HTTP = frozenset({408, 429, 500, 502, 503, 504})
# The connection was made but broke: worth another try.  A refused connection or an unknown host
# is not retried (it is the wrong address or no network, and waiting rarely helps).
TRANSIENT = (
    TimeoutError,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
    http.client.IncompleteRead,
)


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


def digest_path(path: Path) -> Path:
    """Where the SHA-256 of ``path`` is kept: ``NAME.sha256`` beside it."""
    return path.with_name(path.name + ".sha256")


def lock_path(path: Path) -> Path:
    """The lock a process holds while it writes ``path``: ``.locks/NAME.lock`` in its folder."""
    return path.parent / ".locks" / (path.name + ".lock")


def remove(*paths: Path) -> None:
    """Delete files if they are there; a file that cannot be deleted is left alone."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def write_whole(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``NAME.incomplete`` and ``os.replace``."""
    part = partial_path(path)
    try:
        with open(part, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    except OSError as exc:
        remove(part)
        raise write_failure(exc, path) from None


# ---------------------------------------------------------------------------------------------
# Locks

_LOCKS: dict[str, FileLock] = {}  # one object per lock file, so that a process may nest them


@contextmanager
def cache_lock(path: Path, progress: Progress | None = None) -> Iterator[None]:
    """Hold ``lock_path(path)`` for the block: another process that asks for it waits
    (saying so through ``progress``).  Re-entrant within a process."""
    where = lock_path(path)
    lock = _LOCKS.setdefault(os.path.abspath(where), FileLock(str(where)))
    try:
        where.parent.mkdir(exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            (progress or NullProgress()).note(
                f"Waiting for another kdecli process to finish with {path.name} ({where} is held)."
            )
            lock.acquire()
    except OSError as exc:
        raise write_failure(exc, where) from None
    try:
        yield
    finally:
        lock.release()


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


def check_url(url: str) -> str:
    """``url`` if it is an http:// or https:// address with a host; anything else is a usage error."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise UsageError(
            f"cannot download from `{url}`: give an http:// or https:// address.",
            hint="For an archive already on disk, use --from-file.",
        )
    return url.strip()


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    expect_zip: bool = False,
    progress: Progress | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    hints: Hints = Hints(),
    retries: int = RETRIES,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.incomplete``, resuming a partial file, holding
    ``cache_lock(dest)``; write its digest to ``dest.sha256``.

    Resumes with an HTTP Range request; a server that answers 200 instead of 206 gets a clean
    restart.  Transient failures are retried ``retries`` times in a row (module docstring).
    Verified before the move into place: size against Content-Length, ``sha256`` when given, and
    when ``expect_zip`` the zip's central directory and member extents, then (without ``sha256``)
    every member's CRC-32.  A transfer that breaks off (or a KeyboardInterrupt) keeps the partial
    file for the next run; a complete but bad file is removed, and ``dest`` is left as it was.
    """
    url, dest, progress = check_url(url), Path(dest), progress or NullProgress()
    part = partial_path(dest)
    with cache_lock(dest, progress):
        _fetch(url, part, progress, timeout, hints, retries)  # checks the size itself
        actual = sha256_file(part)
        kept = f"; {dest.name} already there was left as it was" if dest.exists() else ""
        if sha256 and actual != sha256.lower():
            remove(part)
            raise RuntimeFailure(
                f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, got {actual}; "
                f"the file was removed{kept}.",
                hint="Run again to download it anew, or check the value given to --sha256.",
            )
        problem = zip_problem(part) if expect_zip else None
        if problem:
            remove(part)
            raise RuntimeFailure(
                f"the file downloaded from {url} is not a valid zip archive ({problem}); "
                f"it was removed{kept}.",
                hint=hints.not_zip,
            )
        if expect_zip and not sha256:
            progress.note(f"Checking the CRC-32 of every member of {dest.name}.")
            damage = zip_damage(part)
            if damage:
                remove(part)
                raise RuntimeFailure(
                    f"the file downloaded from {url} is damaged ({damage}); it was removed{kept}.",
                    hint="Run again to download it anew.",
                )
        remove(digest_path(dest))  # never a digest that belongs to another file
        try:
            os.replace(part, dest)
        except OSError as exc:
            raise write_failure(exc, dest, kept=True) from None
        write_whole(digest_path(dest), digest_line(actual, dest))
    return dest


class _Broken(Exception):
    """A try that failed in a way worth another: ``failure`` is raised once the retries run out."""

    def __init__(self, failure: RuntimeFailure, reason: str):
        super().__init__(reason)
        self.failure, self.reason = failure, reason


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _fetch(
    url: str, part: Path, progress: Progress, timeout: float, hints: Hints, retries: int
) -> int | None:
    """Fill ``part`` with the whole body of ``url``, retrying transient failures; return the size
    the server announced."""
    failures, reached = 0, _size(part)
    while True:
        try:
            return _try(url, part, progress, timeout, hints)
        except _Broken as exc:
            size = _size(part)
            failures = 1 if size > reached else failures + 1  # new bytes: the count starts again
            reached = max(reached, size)
            if failures > retries:
                failure = exc.failure
                if retries:
                    failure = RuntimeFailure(
                        failure.message.removesuffix(".")
                        + f"; {retries} retries in a row got no further.",
                        hint=failure.hint,
                    )
                raise failure from None
            wait = BACKOFF_S * 2 ** (failures - 1)
            progress.note(f"{exc.reason}; retry {failures} of {retries} in {wait:g} s.")
            time.sleep(wait)


def _try(url: str, part: Path, progress: Progress, timeout: float, hints: Hints) -> int | None:
    """One request for the rest of ``url``; raises ``_Broken`` for a failure worth retrying."""
    for _ in range(2):  # a second round only after a stale partial file was dropped
        offset = _size(part)
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
            failure = RuntimeFailure(
                f"downloading {url} failed: HTTP {exc.code} {exc.reason}.", hint=hints.network
            )
            if exc.code in RETRY_HTTP:
                raise _Broken(failure, f"HTTP {exc.code} {exc.reason} from {url}") from None
            raise failure from None
        except urllib.error.URLError as exc:
            failure = RuntimeFailure(f"cannot reach {url}: {exc.reason}.", hint=hints.network)
            if isinstance(exc.reason, TRANSIENT):
                raise _Broken(failure, f"Cannot reach {url} ({exc.reason})") from None
            raise failure from None
        except ValueError as exc:
            raise UsageError(f"cannot download from `{url}`: {exc}.") from None
        except (OSError, http.client.HTTPException) as exc:
            failure = RuntimeFailure(f"cannot reach {url}: {exc}.", hint=hints.network)
            if isinstance(exc, TRANSIENT):
                raise _Broken(failure, f"Cannot reach {url} ({type(exc).__name__})") from None
            raise failure from None
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
        failure = RuntimeFailure(
            f"the download of {url} broke off after {got}{why}.",
            hint=f"Run the same command again to resume; {part} is kept.",
        )
        raise _Broken(failure, f"The download broke off after {got}{why}")
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

ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)


def zip_problem(path: Path) -> str | None:
    """What is wrong with a zip file's structure, or None.  ``zip_damage`` checks the contents."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"{info.filename} runs past the end of the file"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as exc:
        return str(exc) or type(exc).__name__
    return None


def zip_damage(path: Path) -> str | None:
    """The first member of a (structurally sound) zip file that does not read back whole with the
    CRC-32 it records, and why; None when every member does."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                damage = member_damage(archive, info)
                if damage:
                    return damage
    except (*ZIP_READ_ERRORS, ValueError, OSError) as exc:
        return str(exc) or type(exc).__name__
    return None


def member_damage(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str | None:
    """Why one member does not read back whole with its CRC-32, or None."""
    try:
        with archive.open(info) as member:
            while member.read(CHUNK_BYTES * 4):
                pass
    except zipfile.BadZipFile as exc:  # "Bad CRC-32 for file 'NAME'" names the member
        return str(exc)
    except ZIP_READ_ERRORS as exc:
        return f"{info.filename}: {exc or type(exc).__name__}"
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


def digest_line(digest: str, path: Path) -> bytes:
    """The ``sha256sum`` line for ``path``: ``<64 hex digits>  NAME``."""
    return f"{digest}  {path.name}\n".encode()


def recorded_digest(path: Path) -> str | None:
    """The SHA-256 recorded for ``path`` in ``NAME.sha256``, or None when there is none (or it
    names another file, or cannot be read)."""
    try:
        text = digest_path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    match = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)\n?", text)
    return match[1] if match and match[2] == path.name else None


def digest_problem(path: Path) -> str | None:
    """Why ``path`` does not match the digest recorded with it, or None when it does."""
    recorded = recorded_digest(path)
    if recorded is None:
        return f"has no recorded digest ({digest_path(path).name} is missing or unreadable)"
    try:
        actual = sha256_file(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if actual != recorded:
        return f"has sha256 {actual}, not the {recorded} recorded in {digest_path(path).name}"
    return None
