"""`kdecli report FILES...`: re-render saved documents as the table, Markdown, CSV or JSON.

Every document kdecli writes is read: compare results (JSON or JSONL, merged or not), scale and
drift documents; each is rendered by its own kind's renderer (``kdecli.experiments.views``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from kdecli.cli import common as c
from kdecli.cli.app import app
from kdecli.cli.options import (
    OUTPUT,
    EveryHead,
    OutputOptions,
    PerHead,
    check_per_head,
    shared_options,
)
from kdecli.errors import UsageError
from kdecli.experiments.compare.records import RunReport
from kdecli.experiments.documents import cut_short
from kdecli.experiments.views import REPORT_FORMATS, load_report
from kdecli.files import Output
from kdecli.render.safe import printable_lines

ONE_DOCUMENT = ("json", "jsonl")


@app.command("report")
@c.handle_errors
@shared_options(
    out=OUTPUT,
    helps={
        "fmt": "table | markdown | csv | json | jsonl (jsonl: compare results only).",
        "columns": "Table columns, comma-separated, or `all` (default: what fits the terminal); "
        "each kind of document has its own.",
    },
)
def report_command(
    results: list[Path] = typer.Argument(
        ...,
        help="Documents written by `kdecli compare`, `merge`, `scale` or `drift` (JSON, or the "
        "JSONL of compare); several files are rendered one after the other.",
        show_default=False,
    ),
    target_error: c.TargetError = None,
    per_head: PerHead = False,
    every_head: EveryHead = False,
    *,
    out: OutputOptions,
) -> None:
    """Re-render saved results: the table the command printed, Markdown, CSV, or normalised JSON."""
    # imports torch: when the command runs, not for --help
    from kdecli.experiments.compare.heads import cheapest_every_head
    from kdecli.experiments.compare.pareto import cheapest_settings, check_target_error

    c.check_format(out.fmt, REPORT_FORMATS)
    if target_error is not None:
        check_target_error(target_error)
    heads_note = check_per_head(per_head, every_head, target_error, out.fmt)
    if heads_note:
        c.note(heads_note, out.quiet)
    if out.fmt in ONE_DOCUMENT and len(results) > 1:
        raise UsageError(
            f"--format {out.fmt} writes one document; got {len(results)} results files.",
            hint="Render them one at a time, or as a table, markdown or csv.",
        )
    c.check_output(out.output)
    loaded = [(path, *load_report(path)) for path in results]
    for path in filter(cut_short, results):
        c.note(
            f"{path}: its last line was cut short (a run stopped mid-write); left out.", out.quiet
        )
    kinds = list(dict.fromkeys(view.kind for _, _, view in loaded))
    if out.fmt == "csv" and len(kinds) > 1:
        raise UsageError(
            f"--format csv writes one header for all files; these are of kinds {', '.join(kinds)}.",
            hint="Render each kind to its own CSV file.",
        )
    rendered = []
    for path, report, view in loaded:
        view.check_format(out.fmt, str(path))
        columns = view.parse_columns(out.columns)
        if (per_head or every_head) and not isinstance(report, RunReport):
            raise UsageError(
                f"{path}: --per-head and --every-head read the heads of compare results; "
                f"this is a {view.kind} document."
            )
        if target_error is not None:
            if not isinstance(report, RunReport):
                raise UsageError(
                    f"{path}: --target-error picks among the settings of compare results; "
                    f"this is a {view.kind} document."
                )
            pick = cheapest_every_head if every_head else cheapest_settings
            report.pareto = pick(report.results, target_error)
        rendered.append((report, view, columns))
    width, colour = c.table_width(out.output), c.colour(out.output)
    heads = {"per_head": True} if per_head else {}  # compare results only (checked above)
    with Output(out.output) as output:
        for i, (report, view, columns) in enumerate(rendered):
            text = view.render_text(
                report, out.fmt, width=width, columns=columns, colour=colour, verbose=out.verbose,
                **heads,
            )  # fmt: skip
            if out.fmt == "markdown":  # plain text for a terminal too: no control bytes
                text = printable_lines(text, None)
            if i and out.fmt in ("table", "markdown"):
                output.write("\n")
            if i and out.fmt == "csv":  # one header for all files
                text = text.split("\n", 1)[1]
            output.write(text)
    if out.output is not None:
        c.note(f"Wrote {out.output}.", out.quiet)
