"""`kdecli scale INPUT --methods ... --budget 256 --n 4096,...,1048576`: time and error against n;
with `--phase decode`, of one decode step against the cache length n."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import typer

from kdecli.cli import common as c
from kdecli.cli.app import app
from kdecli.cli.options import INPUT, OUTPUT, RUN, OutputOptions, shared_options
from kdecli.cli.run_commands import _split_list
from kdecli.cli.signals import graceful_stop
from kdecli.errors import UsageError
from kdecli.files import Output

if TYPE_CHECKING:  # the library (and torch) is imported when the command runs, not for --help
    from kdecli.measure.config import RunConfig
    from kdecli.sources import InputOptions

# kdecli.experiments.scale.report.FORMATS, here so that `kdecli --help`
# does not import rich tables
FORMATS = ("table", "json", "csv", "markdown")


@app.command("scale")
@c.handle_errors
@shared_options(
    inputs=INPUT.without("n"),
    run=RUN.without("backward"),
    out=OUTPUT.only("fmt", "output", "quiet", "columns"),
    helps={
        "fmt": "table | json | csv | markdown.",
        "phase": "prefill: every query at each n | decode: one decode step (--queries queries at "
        "the last positions) over a cache of n keys, its preparation timed apart.",
        "queries": "--phase decode: queries per step, at the last positions (1: one decode step).",
    },
)
def scale_command(
    input_spec: c.InputArg = None,
    methods: str = typer.Option(
        "kdeformer,hyperattention,performer", "--methods", help="Comma-separated method names."
    ),
    budget: int = typer.Option(256, "--budget", "-b", help="One budget for every length."),
    lengths: str = typer.Option(
        "4096,16384,65536",
        "--n",
        help="Sequence lengths, comma-separated (64k and 1M allowed): a synthetic input is drawn "
        "at each, a file cropped to its first n queries and keys; under --phase decode, cache "
        "lengths.",
    ),
    param: c.Params = None,
    *,
    inputs: InputOptions,
    run: RunConfig,
    out: OutputOptions,
) -> None:
    """Time and error of each method against n, one `compare` per length (each with its own
    reference and exact timing), and the fitted exponent of time in n for each method and for
    exact attention.  --phase decode: one decode step over a cache of n keys against exact
    attention's step, the method's preparation of the cache timed apart and amortised over
    --steps."""
    from kdecli.experiments.scale.report import parse_columns, render_text
    from kdecli.experiments.scale.run import parse_lengths, scale

    c.check_format(out.fmt, FORMATS)
    columns = parse_columns(out.columns)  # before the run, not after it
    c.check_output(out.output)  # (`run` was checked when it was made, before any of this)
    if input_spec is None:
        raise UsageError("scale needs an INPUT, e.g. synthetic:d=64 or a file long enough.")
    ns = parse_lengths(lengths)
    method_list = _split_list(methods, "methods")
    params = c.parse_params(param)
    progress, update = c.progress_printer(out.quiet)
    with graceful_stop(lambda line: c.note(line, out.quiet)) as stop:
        with progress or contextlib.nullcontext():
            report = scale(
                input_spec,
                method_list,
                budget,
                ns,
                run,
                options=inputs,
                params=params,
                on_progress=update,
                should_stop=stop.requested,
            )
    with Output(out.output) as output:
        if report.runs:
            output.write(
                render_text(
                    report,
                    out.fmt,
                    width=c.table_width(out.output),
                    columns=columns,
                    colour=c.colour(out.output),
                )
            )
        else:
            output.discard()
    if report.interrupted:
        c.note(f"Interrupted: kept the {len(report.runs)} lengths that finished.", out.quiet)
        raise typer.Exit(stop.exit_code)
    if out.output is not None:
        c.note(f"Wrote {out.output}.", out.quiet)
