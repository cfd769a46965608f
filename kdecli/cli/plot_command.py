"""`kdecli plot RESULTS...`: draw error curves from the files that `kdecli compare` writes."""

from __future__ import annotations

from pathlib import Path

import typer

from kdecli.cli import common as c
from kdecli.cli.app import app
from kdecli.cli.options import OUTPUT, OutputOptions, shared_options
from kdecli.errors import UsageError
from kdecli.experiments.compare.plot import load_results, plot_reports


def default_image(first: Path, x: str, y: str) -> Path:
    """results.json -> results-rel_spectral-vs-budget.png, next to it."""
    return first.with_name(f"{first.stem}-{y}-vs-{x.replace(',', '-')}.png")


@app.command("plot")
@c.handle_errors
@shared_options(
    out=OUTPUT.only("output", "quiet"),
    helps={
        "output": "Image file: .png, .svg or .pdf (default: next to the first results file, "
        "named after it and the axes)."
    },
)
def plot_command(
    results: list[Path] = typer.Argument(
        ...,
        help="Results of `kdecli compare --format json|jsonl -o FILE`; several files are "
        "drawn together, labelled by device and dtype.",
        show_default=False,
    ),
    x: str = typer.Option(
        "budget",
        "--x",
        help="budget | time | flops, or several comma-separated (one panel each); or layer (runs over a capture's layers); or n (a `kdecli scale` document).",
    ),
    y: str = typer.Option(
        "rel_spectral",
        "--y",
        help="rel_spectral | rel_frobenius | max_row_rel | "
        "bound_normalized (needs compare --bound).",
    ),
    *,
    out: OutputOptions,
) -> None:
    """Draw error against budget, time or FLOPs: one line per method, seeds as a band, floors.
    A `kdecli scale` document (or --x n) draws time and error against n on log axes."""
    from kdecli.experiments.scale.plot import is_scale_document, load_scale, plot_scale

    if x == "n" or is_scale_document(results[0]):
        if len(results) != 1 or not is_scale_document(results[0]):
            raise UsageError("--x n draws one `kdecli scale --format json` document.")
        path = out.output if out.output is not None else default_image(results[0], "n", "time")
        written = plot_scale(load_scale(results[0]), path)
        c.note(f"Wrote {written}.", out.quiet)
        return
    path = out.output if out.output is not None else default_image(results[0], x, y)
    docs = [load_results(file) for file in results]
    written = plot_reports(docs, path, x=x, y=y, names=[file.name for file in results])
    c.note(f"Wrote {written}.", out.quiet)
