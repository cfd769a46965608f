"""`kdecli report RESULTS...`: re-render saved results as the table, Markdown, CSV or JSON."""

from __future__ import annotations

from pathlib import Path

import typer

from kdecli.cli import common as c
from kdecli.cli.app import app
from kdecli.cli.options import OUTPUT, OutputOptions, shared_options
from kdecli.errors import UsageError
from kdecli.experiments.compare.pareto import cheapest_settings, check_target_error
from kdecli.experiments.compare.records import load_document
from kdecli.experiments.compare.report import REPORT_FORMATS, parse_columns, render_text, to_csv
from kdecli.files import Output

ONE_DOCUMENT = ("json", "jsonl")


@app.command("report")
@c.handle_errors
@shared_options(out=OUTPUT, helps={"fmt": "table | markdown | csv | json | jsonl."})
def report_command(
    results: list[Path] = typer.Argument(
        ...,
        help="Results written by `kdecli compare --format json|jsonl -o FILE`; several files "
        "are rendered one after the other.",
        show_default=False,
    ),
    target_error: c.TargetError = None,
    *,
    out: OutputOptions,
) -> None:
    """Re-render saved results: the table `compare` printed, Markdown, CSV, or normalised JSON."""
    c.check_format(out.fmt, REPORT_FORMATS)
    columns = parse_columns(out.columns)
    if target_error is not None:
        check_target_error(target_error)
    if out.fmt in ONE_DOCUMENT and len(results) > 1:
        raise UsageError(
            f"--format {out.fmt} writes one document; got {len(results)} results files.",
            hint="Render them one at a time, or as a table, markdown or csv.",
        )
    c.check_output(out.output)
    reports = [load_document(path) for path in results]
    if target_error is not None:
        for report in reports:
            report.pareto = cheapest_settings(report.results, target_error)
    with Output(out.output) as output:
        for i, report in enumerate(reports):
            if i and out.fmt in ("table", "markdown"):
                output.write("\n")
            if i and out.fmt == "csv":  # one header for all files
                output.write(to_csv(report).split("\n", 1)[1])
                continue
            width, colour = c.table_width(out.output), c.colour(out.output)
            output.write(render_text(report, out.fmt, width=width, columns=columns, colour=colour))
    if out.output is not None:
        c.note(f"Wrote {out.output}.", out.quiet)
