"""`kdecli approx` and `kdecli compare`: load, run, render.  All logic lives in the library."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import typer

from kdecli.cli import common as c
from kdecli.cli.app import app
from kdecli.cli.options import INPUT, OUTPUT, RUN, OutputOptions, shared_options
from kdecli.cli.signals import graceful_stop
from kdecli.errors import Terminated, UsageError
from kdecli.files import Output
from kdecli.pareto import cheapest_settings, check_target_error
from kdecli.report import FORMATS, parse_columns, render_text
from kdecli.results import RunReport, jsonl_header, jsonl_layer, jsonl_pareto, jsonl_result
from kdecli.runner import RunConfig, compare_layers
from kdecli.sources import InputOptions, load_inputs


@dataclass(frozen=True)
class Sweep:
    """What to run: methods × budgets, with their explicit parameters."""

    methods: list[str]
    budgets: list[int]
    params: dict[str, dict[str, Any]]


def _run(
    input_spec: str | None,
    inputs: InputOptions,
    sweep: Sweep,
    run: RunConfig,
    out: OutputOptions,
    plot: str | None = None,
    target_error: float | None = None,
) -> None:
    # everything that can be refused is refused before any output is opened
    c.check_format(out.fmt, FORMATS)
    run.check()  # a bad --reference or --seeds fails before the input is read
    columns = parse_columns(out.columns)
    c.check_output(out.output)
    if target_error is not None:
        check_target_error(target_error)
        if out.fmt == "csv":
            c.note(
                "--target-error: the CSV has one row per record and no room for the cheapest "
                "settings; use --format table, json or jsonl to see them.",
                out.quiet,
            )
    if plot is not None:
        from kdecli.plot import check_plot_path

        check_plot_path(plot)
    layers = load_inputs(input_spec, inputs)
    streaming = out.fmt == "jsonl"
    progress, update = c.progress_printer(out.quiet)
    started: list[RunReport] = []  # the report as it grows, for what to keep if stopped at once

    def on_start(report: RunReport) -> None:
        started.append(report)
        if streaming:
            output.write(jsonl_header(report) + "\n")

    def line(encode):  # a JSONL record, written as one line and flushed
        return lambda record: output.write(encode(record) + "\n")

    exit_code = 0
    with Output(out.output, flush_each=streaming) as output:
        with graceful_stop(lambda line: c.note(line, out.quiet)) as stop:
            try:
                with progress or contextlib.nullcontext():
                    report = compare_layers(
                        layers, sweep.methods, sweep.budgets, run, params=sweep.params,
                        on_start=on_start, on_progress=update, should_stop=stop.requested,
                        on_layer=line(jsonl_layer) if streaming else None,
                        on_result=line(jsonl_result) if streaming else None,
                    )  # fmt: skip
                exit_code = stop.exit_code if report.interrupted else 0
            except KeyboardInterrupt as exc:  # a second signal: stop at once, keep what finished
                if not (started and started[0].results):
                    raise
                report, report.interrupted = started[0], True
                exit_code = 143 if isinstance(exc, Terminated) else 130
        if report.interrupted and not report.results:
            output.discard()  # nothing finished: the previous file stays as it was
        else:
            if target_error is not None and not report.interrupted:
                report.pareto = cheapest_settings(report.results, target_error)
                if streaming:
                    output.write(jsonl_pareto(report.pareto) + "\n")
            if not streaming:
                output.write(
                    render_text(
                        report,
                        out.fmt,
                        width=c.table_width(out.output),
                        columns=columns,
                        colour=c.colour(out.output),
                    )  # fmt: skip
                )
    if report.interrupted:
        where = output.label if report.results else f"nothing; {output.label} left as it was"
        c.note(f"Interrupted: kept {len(report.results)} finished records in {where}.", out.quiet)
        raise typer.Exit(exit_code)
    if out.output is not None:
        c.note(f"Wrote {out.output}.", out.quiet)
    if plot is not None:
        from kdecli.plot import plot_reports

        plot_reports([report], plot)
        c.note(f"Wrote {plot}.", out.quiet)


@app.command("approx")
@c.handle_errors
@shared_options(inputs=INPUT, run=RUN.without("seeds"), out=OUTPUT, repeats=5)
def approx_command(
    input_spec: c.InputArg = None,
    method: str = typer.Option("kdeformer", "--method", "-m", help="A name from `kdecli methods`."),
    budget: int = typer.Option(
        256, "--budget", "-b", help="Keys or features per query (see `kdecli methods NAME`)."
    ),
    param: c.Params = None,
    *,
    inputs: InputOptions,
    run: RunConfig,
    out: OutputOptions,
) -> None:
    """Run one method at one budget and report its error and time against exact attention."""
    sweep = Sweep([method], [budget], c.parse_params(param, default_method=method))
    _run(input_spec, inputs, sweep, run, out)


def _split_list(text: str, what: str, convert=str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"--{what} is empty.")
    try:
        return [convert(item) for item in items]
    except ValueError:
        raise UsageError(
            f"--{what} must be a comma-separated list of integers; got {text!r}."
        ) from None


@app.command("compare")
@c.handle_errors
@shared_options(inputs=INPUT, run=RUN, out=OUTPUT)
def compare_command(
    input_spec: c.InputArg = None,
    methods: str = typer.Option(
        "exact,kdeformer,performer,reformer,scatterbrain",
        "--methods",
        help="Comma-separated method names.",
    ),
    budgets: str = typer.Option("64,128,256,512", "--budgets", help="Comma-separated budgets."),
    param: c.Params = None,
    plot: str = typer.Option(None, "--plot", help="Also draw the error curves to this image file."),
    target_error: c.TargetError = None,
    *,
    inputs: InputOptions,
    run: RunConfig,
    out: OutputOptions,
) -> None:
    """Run every method × budget × seed against one exact reference; mean ± std over seeds."""
    sweep = Sweep(
        _split_list(methods, "methods"),
        _split_list(budgets, "budgets", int),
        c.parse_params(param),
    )
    _run(input_spec, inputs, sweep, run, out, plot=plot, target_error=target_error)
