"""`kdecli merge FILES... -o ALL.json`: the shards of one sweep as one document (``kdecli.sweeps.merge``)."""

from __future__ import annotations

from pathlib import Path

import typer

from kdecli.cli import common as c
from kdecli.cli.app import app
from kdecli.cli.options import OUTPUT, OutputOptions, shared_options
from kdecli.experiments.compare.records import to_json
from kdecli.experiments.documents import cut_short, load_compare
from kdecli.files import Output
from kdecli.sweeps.grid import JobEntry
from kdecli.sweeps.merge import Merged, differences, merge_reports

LISTED = 10  # missing records named in the warning; the rest are counted


@app.command("merge")
@c.handle_errors
@shared_options(
    out=OUTPUT.only("output", "quiet"),
    helps={"output": "Write the merged JSON document to FILE (default: standard output)."},
)
def merge_command(
    files: list[Path] = typer.Argument(
        ...,
        help="Results of `kdecli compare --format json|jsonl -o FILE` for one grid (its shards, "
        "retries, earlier merges), in any order.",
        show_default=False,
    ),
    *,
    out: OutputOptions,
) -> None:
    """Merge the shards of one sweep into one JSON document, the same in any order.
    Merging again changes nothing; files of different grids are refused."""
    c.check_output(out.output)
    reports = [load_compare(path) for path in files]
    for path in filter(cut_short, files):
        c.note(
            f"{path}: its last line was cut short (a run stopped mid-write); left out.", out.quiet
        )
    merged = merge_reports(reports, [str(path) for path in files])
    with Output(out.output) as output:
        output.write(to_json(merged.report) + "\n")
    c.note(summary(merged, len(files), out.output), out.quiet)
    for conflict in merged.conflicts:
        kept = merged.report.results[_index(merged, conflict.key)]
        n = len(conflict.records) + 1
        c.warn(
            f"{_describe(conflict.job)}: {n} different measurements "
            f"({differences(kept, conflict.records[0])}); kept one, the "
            f"other{'s' if n > 2 else ''} under merge.conflicts.",
            out.quiet,
        )
    if merged.missing:
        c.warn(missing_line(merged.missing, merged.grid_records), out.quiet)


def summary(merged: Merged, files: int, output: Path | None) -> str:
    """``Merged 3 files into ALL.json: 60 records of 64 in the grid; 2 identical duplicates
    dropped.``"""
    into = "" if output is None else f" into {output}"
    parts = [
        f"Merged {_count(files, 'file')}{into}: {_count(merged.records, 'record')} of "
        f"{merged.grid_records} in the grid"
    ]
    if merged.duplicates_dropped:
        parts.append(f"{_count(merged.duplicates_dropped, 'identical duplicate')} dropped")
    if merged.superseded:
        parts.append(f"{_count(merged.superseded, 'failed record')} superseded")
    if merged.conflicts:
        parts.append(f"{_count(len(merged.conflicts), 'conflict')}")
    return "; ".join(parts) + "."


def missing_line(missing: tuple[JobEntry, ...], total: int) -> str:
    """The grid's records that no file holds: the first ``LISTED`` by name, then a count."""
    named = ", ".join(job.describe() for job in missing[:LISTED])
    more = f", and {len(missing) - LISTED} more" if len(missing) > LISTED else ""
    return (
        f"{len(missing)} of {total} records of the grid are in no file: {named}{more}. Run "
        "them (`kdecli compare` with the sweep's --num-shards N --shard-id I and --resume "
        "FILE.jsonl) and merge again."
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _describe(job: JobEntry | None) -> str:
    return "a record" if job is None else job.describe()


def _index(merged: Merged, key: str) -> int:
    return next(i for i, r in enumerate(merged.report.results) if r.key == key)
