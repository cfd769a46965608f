"""``--resume FILE.jsonl``: a results file that a run appends to record by record, and that a
rerun of the same grid continues.

The file is a JSONL stream (``kdecli.experiments.compare.records``): a run line carrying the grid, layer lines, and
one result line per finished record, each written whole, flushed and synced before the run moves
on, so a killed run loses no finished record.  A rerun reads it back, refuses it when its grid
(or its shard) differs from the one asked for, drops a last line a crash cut short, skips every
record already there with status ``ok`` and retries the others; their new lines follow the old
ones, and readers keep per key the last ``ok`` record (``results.latest_per_key``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from kdecli.errors import UsageError
from kdecli.experiments.compare.records import Result, RunReport, parse_document
from kdecli.files import check_writable, write_failure
from kdecli.records import SchemaError
from kdecli.sweeps.grid import GridInfo


@dataclass
class ResumeFile:
    """A resume file opened for appending; ``previous`` is what it held (None: a new file)."""

    path: Path
    previous: RunReport | None = None
    dropped_partial: bool = False  # a last line cut short by a crash was dropped
    whole_bytes: int = 0  # the length of the file's whole lines
    _stream: TextIO | None = field(default=None, repr=False)

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
    def open(cls, path: Path, grid: GridInfo) -> ResumeFile:
        """Read ``path`` (absent or empty: a new file) and check it belongs to ``grid``; nothing
        is changed in it until the first ``append``."""
        path = Path(path)
        check_writable(path, f"--resume {path}")
        if not path.exists():
            return cls(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"--resume {path}: cannot be read ({exc.strerror}).") from None
        complete = raw[: raw.rfind(b"\n") + 1]  # a crash can only cut the last line short
        resume = cls(path, dropped_partial=len(complete) < len(raw), whole_bytes=len(complete))
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
            raise write_failure(f"--resume {self.path}", exc) from None

    def _open(self) -> None:
        if self.dropped_partial:  # cut the half line, so the next record starts a line
            os.truncate(self.path, self.whole_bytes)
        self._stream = open(self.path, "a", encoding="utf-8")

    @property
    def is_new(self) -> bool:
        return self.previous is None

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> ResumeFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
