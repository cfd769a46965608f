"""``--resume FILE.jsonl``: a results file that a run appends to record by record, and that a
rerun of the same grid continues.

The file is a JSONL stream (``kdecli.experiments.compare.records``): a run line carrying the grid, layer lines, and
one result line per finished record, each written whole, flushed and synced before the run moves
on, so a killed run loses no finished record.  A rerun reads it back, refuses it when its grid
(or its shard) differs from the one asked for, drops a last line a crash cut short, skips every
record already there with status ``ok`` and retries the others; their new lines follow the old
ones, and readers keep per key the last ``ok`` record (``results.latest_per_key``).

One run at a time: ``open`` takes the lock ``FILE.jsonl.lock`` (``filelock``) before it reads the
file and holds it until ``close``, and writes who holds it (pid and host) beside it in
``FILE.jsonl.lock.holder``.  A second run on the same file (two shells, two SLURM jobs) waits for
the first, saying which process it waits for, and then reads what the first one wrote: it skips
those records, so none is written twice; or, given a ``wait`` that runs out, ends naming the
holder.  The cut last line that a crash left is truncated under the lock, and only if the file is
still the length it was read at: only the cut bytes go.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from filelock import FileLock, Timeout

from kdecli.errors import RuntimeFailure, UsageError
from kdecli.experiments.compare.records import Result, RunReport, parse_document
from kdecli.files import check_writable, write_failure
from kdecli.records import SchemaError
from kdecli.render.safe import printable
from kdecli.sweeps.grid import GridInfo


@dataclass
class ResumeFile:
    """A resume file opened for appending; ``previous`` is what it held (None: a new file)."""

    path: Path
    previous: RunReport | None = None
    dropped_partial: bool = False  # a last line cut short by a crash was dropped
    whole_bytes: int = 0  # the length of the file's whole lines
    read_bytes: int = 0  # the length of the file when it was read
    _stream: TextIO | None = field(default=None, repr=False)
    _lock: FileLock | None = field(default=None, repr=False)

    @property
    def done(self) -> frozenset[str]:
        """The keys recorded ``ok``: what a rerun skips."""
        if self.previous is None:
            return frozenset()
        return frozenset(r.key for r in self.previous.results if r.ok and r.key is not None)

    def previous_records(self, rerun: frozenset[str]) -> list[Result]:
        """The file's records that this run does not redo."""
        if self.previous is None:
            return []
        return [r for r in self.previous.results if r.key not in rerun]

    @classmethod
    def open(
        cls,
        path: Path,
        grid: GridInfo,
        *,
        wait: float | None = None,
        on_wait: Callable[[str], None] | None = None,
    ) -> ResumeFile:
        """Lock ``path``, read it (absent or empty: a new file) and check it belongs to ``grid``;
        nothing is changed in it until the first ``append``.  Another process holding it: say so
        through ``on_wait`` and wait for it, at most ``wait`` seconds (None: as long as it takes),
        then ``RuntimeFailure`` naming the holder.  ``close`` lets the lock go."""
        path = Path(path)
        check_writable(path, f"--resume {path}")
        lock = _lock(path, wait, on_wait)
        try:
            resume = cls._read(path, grid)
        except BaseException:
            _unlock(path, lock)
            raise
        resume._lock = lock
        return resume

    @classmethod
    def _read(cls, path: Path, grid: GridInfo) -> ResumeFile:
        if not path.exists():
            return cls(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"--resume {path}: cannot be read ({exc.strerror}).") from None
        complete = raw[: raw.rfind(b"\n") + 1]  # a crash can only cut the last line short
        resume = cls(
            path,
            dropped_partial=len(complete) < len(raw),
            whole_bytes=len(complete),
            read_bytes=len(raw),
        )
        if not complete.strip():
            return resume  # nothing whole was written: the run starts afresh
        try:
            text = complete.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"--resume {path}: is not a kdecli JSONL results file.") from None
        if not text.lstrip().startswith('{"type": "run"'):
            raise UsageError(
                f"--resume {path}: is not a JSONL results file of `kdecli compare` (its first "
                'line is not {"type": "run", ...}).',
                hint="Give a new file name, or the .jsonl a previous --resume run wrote.",
            )
        try:
            previous = parse_document(text, path)
        except SchemaError as exc:
            raise UsageError(f"--resume {exc.message}", hint=exc.hint) from None
        except RecursionError:
            raise UsageError(
                f"--resume {path}: is nested too deeply to be a results file."
            ) from None
        _check_grid(path, previous.grid, grid)
        resume.previous = previous
        return resume

    def append(self, line: str) -> None:
        """One whole line, flushed and synced: it survives a kill of this process."""
        try:
            if self._stream is None:
                self._open()
            self._stream.write(line + "\n")
            self._stream.flush()
            os.fsync(self._stream.fileno())
        except OSError as exc:
            self._drop_stream()  # what it buffered would fail again on close
            raise write_failure(f"--resume {self.path}", exc) from None

    def _open(self) -> None:
        if self.dropped_partial:  # cut the half line, so the next record starts a line
            size = self.path.stat().st_size
            if size != self.read_bytes:  # a writer that took no lock (an older kdecli)
                raise RuntimeFailure(
                    f"--resume {self.path}: changed while this run held its lock "
                    f"({self.read_bytes} bytes when read, {size} now); left as it is.",
                    hint="Run one kdecli at a time on a resume file.",
                )
            os.truncate(self.path, self.whole_bytes)
            self.dropped_partial = False
        self._stream = open(self.path, "a", encoding="utf-8")

    def _drop_stream(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            with contextlib.suppress(OSError):
                stream.close()

    @property
    def is_new(self) -> bool:
        return self.previous is None

    def close(self) -> None:
        """Close the file (a failure to write what remains names it) and let the lock go."""
        try:
            if self._stream is not None:
                stream, self._stream = self._stream, None
                try:
                    stream.close()
                except OSError as exc:
                    raise write_failure(f"--resume {self.path}", exc) from None
        finally:
            if self._lock is not None:
                lock, self._lock = self._lock, None
                _unlock(self.path, lock)

    def __enter__(self) -> ResumeFile:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:  # the error that ended the run is the one to tell
            self._drop_stream()
        self.close()


# ---- the lock ----------------------------------------------------------------------------------


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def holder_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock.holder")


def _lock(path: Path, wait: float | None, on_wait: Callable[[str], None] | None) -> FileLock:
    """Hold ``lock_path(path)`` and write this process into ``holder_path(path)``."""
    lock = FileLock(str(lock_path(path)))
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = _holder(path)
            if wait is not None and wait <= 0:
                raise _busy(path, holder) from None
            if on_wait is not None:
                on_wait(
                    f"--resume {path}: waiting for {holder}, which is writing it, to finish "
                    "(Ctrl-C stops)."
                )
            try:
                lock.acquire(timeout=-1 if wait is None else wait)
            except Timeout:
                raise _busy(path, _holder(path)) from None
        holder_path(path).write_text(f"{os.getpid()} {socket.gethostname()}\n", "utf-8")
    except OSError as exc:
        if lock.is_locked:
            lock.release()
        raise write_failure(f"--resume {path} (its lock {lock_path(path).name})", exc) from None
    return lock


def _unlock(path: Path, lock: FileLock) -> None:
    with contextlib.suppress(OSError):
        holder_path(path).unlink()
    lock.release()


def _holder(path: Path) -> str:
    """``process 1234 on host gpu07`` from the holder file, or ``another process``."""
    try:
        pid, host = holder_path(path).read_text("utf-8").split()
        if pid.isdigit():
            return f"process {pid} on host {printable(host, 64)}"
    except (OSError, ValueError):
        pass
    return "another process"


def _busy(path: Path, holder: str) -> RuntimeFailure:
    return RuntimeFailure(
        f"--resume {path}: {holder} is writing it (it holds {lock_path(path).name}).",
        hint="Wait for that run to finish, or give this run another file.",
    )


def _check_grid(path: Path, theirs: GridInfo | None, mine: GridInfo) -> None:
    if theirs is None:
        raise UsageError(
            f"--resume {path}: has no job grid (written before kdecli 0.6), so its records "
            "cannot be matched to jobs.",
            hint="Give a new file name to start a resumable run.",
        )
    difference = theirs.difference(mine)
    if difference:
        raise UsageError(
            f"--resume {path}: was written by a different grid than this run's: {difference}.",
            hint="Rerun with the arguments that wrote it, or give a new file name.",
        )
    if (theirs.shard_id, theirs.num_shards) != (mine.shard_id, mine.num_shards):
        raise UsageError(
            f"--resume {path}: holds {_shard(theirs)}, but this run is {_shard(mine)}.",
            hint="Give each shard its own file; `kdecli merge` joins them.",
        )


def _shard(grid: GridInfo) -> str:
    if grid.num_shards is None:
        return "the whole grid"
    return f"shard {grid.shard_id} of {grid.num_shards}"
