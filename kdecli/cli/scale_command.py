"""`kdecli scale INPUT --methods ... --budget 256 --n 4096,...,1048576`: time and error against n;
with `--phase decode`, of one decode step against the cache length n; with `--target-error E`,
each method's smallest budget meeting E at each n (no timing)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Optional

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
    budget: Optional[int] = typer.Option(
        None, "--budget", "-b", help="One budget for every length (default 256)."
    ),
    lengths: str = typer.Option(
        "4096,16384,65536",
        "--n",
        help="Sequence lengths, comma-separated (64k and 1M allowed): a synthetic input is drawn "
        "at each, a file cropped to its first n queries and keys; under --phase decode, cache "
        "lengths.",
    ),
    param: c.Params = None,
    target_error: Optional[float] = typer.Option(
        None,
        "--target-error",
        help="Instead of timing: each method's smallest budget whose error (rel_spectral, the mean "
        "over seeds and heads) is at most this, at each n, and its density budget/n.",
    ),
    budgets: Optional[str] = typer.Option(
        None,
        "--budgets",
        help="--target-error: the budgets searched, comma-separated (default: powers of two from "
        "16 to n, and n).",
    ),
    every_head: bool = typer.Option(
        False, "--every-head", help="--target-error: every batch×head slice must meet it."
    ),
    search: str = typer.Option(
        "bisect",
        "--search",
        help="--target-error: bisect (assumes the error falls as the budget grows) | all (every "
        "budget measured).",
    ),
    *,
    inputs: InputOptions,
    run: RunConfig,
    out: OutputOptions,
) -> None:
    """Time and error of each method against n, one `compare` per length (each with its own
    reference and exact timing), and the fitted exponent of time in n for each method and for
    exact attention.  --phase decode: one decode step over a cache of n keys against exact
    attention's step, the method's preparation of the cache timed apart and amortised over
    --steps.  --target-error E: no timing; per method, the smallest budget of a grid meeting E at
    each n (a file cropped to its first n positions: for a capture, the causal prefill of its
    first n tokens)."""
    from kdecli.experiments.scale.report import parse_columns
    from kdecli.experiments.scale.run import parse_lengths, scale

    c.check_format(out.fmt, FORMATS)
    columns = parse_columns(out.columns)  # before the run, not after it
    c.check_output(out.output)  # (`run` was checked when it was made, before any of this)
    if input_spec is None:
        raise UsageError("scale needs an INPUT, e.g. synthetic:d=64 or a file long enough.")
    ns = parse_lengths(lengths)
    method_list = _split_list(methods, "methods")
    params = c.parse_params(param)
    if target_error is not None or budgets is not None or every_head or search != "bisect":
        _check_tolerable(target_error, budget, out.columns, inputs.all_layers)
        _tolerable(input_spec, method_list, ns, target_error, budgets, every_head, search, params,
                   inputs, run, out)  # fmt: skip
        return
    budget = 256 if budget is None else budget
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
    _write(report, len(report.runs), out, stop, columns)


def _write(report, finished: int, out, stop, columns=None) -> None:
    """The document of ``finished`` lengths written whole (nothing when none finished), then
    what an interrupted run kept and where the file went."""
    from kdecli.experiments.scale.report import render_text

    with Output(out.output) as output:
        if finished:
            width, colour = c.table_width(out.output), c.colour(out.output)
            output.write(render_text(report, out.fmt, width=width, columns=columns, colour=colour))
        else:
            output.discard()
    if report.interrupted:
        c.note(f"Interrupted: kept the {finished} lengths that finished.", out.quiet)
        raise typer.Exit(stop.exit_code)
    if out.output is not None:
        c.note(f"Wrote {out.output}.", out.quiet)


def _check_tolerable(target_error, budget, columns, all_layers) -> None:
    """What --target-error cannot be given with, in one line each."""
    if target_error is None:
        raise UsageError("--budgets, --every-head and --search go with --target-error E.")
    if budget is not None:
        raise UsageError("--target-error searches the budget: give the grid with --budgets.")
    if columns is not None:
        raise UsageError("--columns: the --target-error table has one column per n.")
    if all_layers:
        raise UsageError("--target-error measures one input: pick a layer, FILE.h5:/layer15.")


def _tolerable(input_spec, methods, ns, target_error, budgets, every_head, search, params,
               inputs, run, out) -> None:  # fmt: skip
    """`scale --target-error`: the search, then its document written whole."""
    from kdecli.experiments.scale.tolerable import parse_budgets, tolerable_budgets

    grid = parse_budgets(budgets)
    progress, update = c.progress_printer(out.quiet)
    with graceful_stop(lambda line: c.note(line, out.quiet)) as stop:
        with progress or contextlib.nullcontext():
            report = tolerable_budgets(
                input_spec, methods, ns, target_error, run, budgets=grid, every_head=every_head,
                search=search, options=inputs, params=params, on_progress=update,
                should_stop=stop.requested,
            )  # fmt: skip
    _write(report, len(report.lengths), out, stop)
