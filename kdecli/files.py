"""Files kdecli writes: checked before a long run, and written whole or not at all.

``check_writable`` refuses a path that cannot be written before any work starts.  ``Output`` is
where results go: standard output, or a file that is written to a temporary file in the same folder
and renamed over the target only when complete, so an interrupted or failed run leaves the previous
file as it was (or none).  A target that is not a regular file (``/dev/null``, a FIFO) is written
directly: renaming over it would replace the device.  Write failures name the file ("cannot write
out.json: No space left on device."); a closed pipe on standard output is left to the caller
(``BrokenPipeError``), which ends quietly as other tools do.

A written file gets the permissions a plain ``open`` would give it (those of the file it replaces,
or 0666 less the umask), not the 0600 of a temporary file.  Temporary names carry the writer's pid
and host (``.out.json.1234@host.k3j9x0aq.tmp``, ``qkv.h5.1234@host.incomplete``), so two writers
never share one, and ``remove_stale`` (called before each write) removes those that a killed
process on this host left behind; those of live processes or other hosts are left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from kdecli.errors import RuntimeFailure, UsageError


def check_writable(path: Path, label: str) -> None:
    """Raise ``UsageError`` (naming ``label``, e.g. "--output out.json") unless ``path`` can be written."""
    if path.is_dir():
        raise UsageError(f"{label}: is a folder; give a file name.")
    if not _is_regular_or_absent(path):  # a device or a FIFO is written in place
        if not os.access(path, os.W_OK):
            raise UsageError(f"{label}: not writable.")
        return
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{label}: folder {parent} does not exist.")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{label}: not writable.")


def require_regular(path: Path, label: str) -> None:
    """Refuse a target that is there but is no regular file (a device, a FIFO), for a writer that
    must rename its finished file into place (renaming over a device would replace it)."""
    if not _is_regular_or_absent(path):
        raise UsageError(f"{label}: is not a regular file (a device or a pipe); give a file name.")


def write_failure(what: str, exc: OSError) -> RuntimeFailure:
    return RuntimeFailure(f"cannot write {what}: {exc.strerror or exc}.")


def _is_regular_or_absent(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except FileNotFoundError:
        return True


# ---- temporary files: named by their writer, their mode the target's ---------------------------


def writer_tag() -> str:
    """``1234@host``: the process that writes a temporary file, in its name."""
    return f"{os.getpid()}@{socket.gethostname()}"


def incomplete_path(path: Path) -> Path:
    """Where a writer that wants a file name builds ``path`` before renaming it into place."""
    return path.with_name(f"{path.name}.{writer_tag()}.incomplete")


def _stale_pattern(name: str) -> re.Pattern:
    # .NAME.PID@HOST.XXXXXXXX.EXT (mkstemp's 8 random characters) or NAME.PID@HOST.incomplete
    name = re.escape(name)
    return re.compile(
        rf"^(?:\.{name}\.(?P<pid>\d+)@(?P<host>.+)\.[A-Za-z0-9_]{{8}}\.[^.]+"
        rf"|{name}\.(?P<ipid>\d+)@(?P<ihost>.+)\.incomplete)$"
    )


def remove_stale(path: Path) -> list[Path]:
    """Remove the temporary files of ``path`` that a process of this host left when it died
    (killed, or its machine's power cut); return them."""
    parent = path.parent if str(path.parent) else Path(".")
    pattern, host, removed = _stale_pattern(path.name), socket.gethostname(), []
    try:
        names = [e.name for e in os.scandir(parent) if path.name in e.name]
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if match is None:
            continue
        pid = int(match["pid"] or match["ipid"])
        if (match["host"] or match["ihost"]) != host or pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(OSError):
            os.remove(parent / name)
            removed.append(parent / name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, under another user
        return True
    return True


def _umask() -> int:
    try:  # Linux says it without changing it
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_mode(fd: int, path: Path) -> None:
    """Give a temporary file the mode ``open(path, "w")`` would: the replaced file's, or 0666
    less the umask (mkstemp makes it 0600)."""
    if not hasattr(os, "fchmod"):  # Windows: no modes to give
        return
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
    os.fchmod(fd, mode)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (e.g. ``savefig``);
    renamed over ``path`` when the block ends normally, removed when it raises."""
    if not _is_regular_or_absent(path):
        yield path
        return
    remove_stale(path)
    prefix = f".{path.name}.{writer_tag()}."
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=path.suffix or ".tmp")
    try:
        _give_mode(fd, path)
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


class Output:
    """Where results go: standard output (``path`` None) or a file written whole.

    ``write`` may be called many times (JSONL lines as records finish, each flushed); the file
    appears at ``path`` only on ``commit``.  Use as a context manager: leaving it normally commits,
    leaving it by an exception discards the temporary file.
    """

    def __init__(self, path: Path | None, *, flush_each: bool = False):
        self.path = path
        self.flush_each = flush_each
        self._stream: TextIO | None = None
        self._tmp: str | None = None
        self.written = False

    @property
    def label(self) -> str:
        return "standard output" if self.path is None else str(self.path)

    def stream(self) -> TextIO:
        """The open stream (created at the first call: nothing is opened before it is needed)."""
        if self._stream is None:
            if self.path is None:
                self._stream = sys.stdout
            elif not _is_regular_or_absent(self.path):
                self._stream = self._guard(lambda: open(self.path, "w", encoding="utf-8"))
            else:
                parent = self.path.parent if str(self.path.parent) else Path(".")

                def create() -> TextIO:
                    remove_stale(self.path)
                    fd, self._tmp = tempfile.mkstemp(
                        dir=parent, prefix=f".{self.path.name}.{writer_tag()}.", suffix=".tmp"
                    )
                    _give_mode(fd, self.path)
                    return os.fdopen(fd, "w", encoding="utf-8")

                self._stream = self._guard(create)
        return self._stream

    def write(self, text: str) -> None:
        stream = self.stream()
        self._guard(lambda: stream.write(text))
        if self.flush_each:
            self._guard(stream.flush)
        self.written = True

    def commit(self) -> None:
        """Flush, and move the finished file into place (nothing happens if nothing was written)."""
        if self._stream is None:
            return
        stream, self._stream = self._stream, None
        if self.path is None:
            self._guard(stream.flush)
            return
        try:
            self._guard(stream.flush)
            if self._tmp is not None:
                self._guard(lambda: os.fsync(stream.fileno()))
        except BaseException:
            with contextlib.suppress(OSError):  # closing flushes again; the first error says it
                stream.close()
            raise
        self._guard(stream.close)
        if self._tmp is not None:
            self._guard(lambda: os.replace(self._tmp, self.path))
            self._tmp = None

    def discard(self) -> None:
        """Forget what was written: the target stays as it was."""
        if self._stream is not None and self.path is not None:
            with contextlib.suppress(OSError):
                self._stream.close()
        self._stream = None
        if self._tmp is not None:
            _remove(self._tmp)
            self._tmp = None

    def __enter__(self) -> Output:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is None:
            self.commit()
        else:
            self.discard()
        return False

    def _guard(self, action: Callable):
        try:
            return action()
        except BrokenPipeError:
            if self.path is None:
                raise
            raise write_failure(self.label, BrokenPipeError(32, "Broken pipe")) from None
        except OSError as exc:
            self.discard()
            raise write_failure(self.label, exc) from None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
