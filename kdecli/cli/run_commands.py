"""`kdecli approx` and `kdecli compare`: load, run, render.  All logic lives in the library."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import typer

from kdecli.cli import common as c
from kdecli.cli.app import app
from kdecli.cli.options import (
    INPUT,
    OUTPUT,
    RUN,
    SWEEP,
    EveryHead,
    OutputOptions,
    PerHead,
    check_per_head,
    shared_options,
)
from kdecli.cli.signals import graceful_stop
from kdecli.errors import Terminated, UsageError
from kdecli.experiments.compare.records import (
    RunReport,
    jsonl_header,
    jsonl_layer,
    jsonl_pareto,
    jsonl_result,
)
from kdecli.files import Output
from kdecli.sweeps.grid import keys_of
from kdecli.sweeps.options import SweepOptions, executor
from kdecli.sweeps.resume import ResumeFile

if TYPE_CHECKING:  # the library (and torch) is imported when a command runs, not for --help
    from kdecli.measure.config import RunConfig
    from kdecli.sources import InputOptions


@dataclass(frozen=True)
class Sweep:
    """What to run: methods × budgets, with their explicit parameters."""

    methods: list[str]
    budgets: list[int]
    params: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Heads:
    """``--per-head`` (the worst-heads table) and ``--every-head`` (how --target-error judges)."""

    per_head: bool = False
    every_head: bool = False


def _run(
    input_spec: str | None,
    inputs: InputOptions,
    sweep: Sweep,
    run: RunConfig,
    out: OutputOptions,
    plot: str | None = None,
    target_error: float | None = None,
    spread: SweepOptions = SweepOptions(),
    heads: Heads = Heads(),
) -> None:
    from kdecli.experiments.compare.pareto import check_target_error
    from kdecli.experiments.compare.plan import plan_grid
    from kdecli.experiments.compare.report import FORMATS, parse_columns
    from kdecli.sources import load_inputs

    # everything that can be refused is refused before any output is opened
    c.check_format(out.fmt, FORMATS)
    heads_note = check_per_head(heads.per_head, heads.every_head, target_error, out.fmt)
    if heads_note:
        c.note(heads_note, out.quiet)
    spread.check()  # (a RunConfig is checked when it is made: before the input is read)
    columns = parse_columns(out.columns)
    c.check_output(out.output)
    if spread.resume is not None and out.output is not None:
        if out.output.resolve() == spread.resume.resolve():
            raise UsageError(
                f"--output and --resume name the same file ({out.output}); --resume appends "
                "each record to it as it finishes, --output writes the whole report at the end."
            )
    if spread.executor == "ray" and run.phase == "both":
        raise UsageError(
            "--phase both runs with --executor local; on Ray, run --phase prefill and "
            "--phase decode as two runs."
        )
    if target_error is not None:
        check_target_error(target_error)
        if run.phase == "both":
            c.note(
                "--target-error with --phase both: the cheapest settings are picked over the "
                "two phases together; run one phase to pick within it.",
                out.quiet,
            )
        if out.fmt == "csv":
            c.note(
                "--target-error: the CSV has one row per record and no room for the cheapest "
                "settings; use --format table, json or jsonl to see them.",
                out.quiet,
            )
    if plot is not None:
        from kdecli.experiments.compare.plot import check_plot_path

        check_plot_path(plot)
    layers = load_inputs(input_spec, inputs)
    grid = plan_grid(
        layers, sweep.methods, sweep.budgets, _planning(run, spread), params=sweep.params
    )
    if run.phase != "prefill" and not all(qkv.causal(run.causal) for qkv in layers):
        c.note(
            "--phase decode: the input is not causal; each of the last "
            f"{run.queries} queries is measured over its own prefix (a causal mask).",
            out.quiet,
        )
    info = grid.info(spread.shard_id, spread.num_shards)
    jobs = grid.shard(spread.shard_id, spread.num_shards) if spread.sharded else grid.jobs
    wanted = keys_of(jobs)
    if spread.sharded:
        c.note(
            f"{spread.shard_label().capitalize()}: {len(jobs)} of {len(grid.jobs)} jobs "
            f"({len(wanted)} of {len(grid.keys)} records; grid {info.digest}).",
            out.quiet,
        )
    with contextlib.ExitStack() as stack:
        resume = None
        if spread.resume is not None:
            resume = stack.enter_context(  # another run on the file: wait for it, saying so
                ResumeFile.open(spread.resume, info, on_wait=lambda line: c.note(line, out.quiet))
            )
            wanted = _resuming(resume, wanted, spread, out.quiet)
        if resume is not None and not wanted and resume.previous is not None:
            c.note(f"Nothing left to run: {resume.path} holds every record.", out.quiet)
            report = _resumed_report(resume, None, info)
            _render(report, out, columns, target_error, streaming=False, heads=heads)
        else:
            report = _execute(
                layers, jobs, run, out, spread, info, wanted, resume, columns, target_error, heads
            )
    if out.output is not None:
        c.note(f"Wrote {out.output}.", out.quiet)
    if plot is not None:
        from kdecli.experiments.compare.plot import plot_reports

        plot_reports([report], plot)
        c.note(f"Wrote {plot}.", out.quiet)


def _planning(run: RunConfig, spread: SweepOptions) -> RunConfig:
    """The config record keys are planned under: Ray's tasks run on the cluster's devices, so
    ``--device cuda`` names the tasks' device kind, which this machine need not have (keys name
    the kind only; under ``auto`` a cluster with GPUs is named by ``--device cuda``)."""
    if spread.executor == "ray" and str(run.device).startswith("cuda"):
        import torch

        return replace(run, device=torch.device("cuda"))
    return run


def _resuming(resume: ResumeFile, wanted: frozenset[str], spread: SweepOptions, quiet: bool):
    """The keys still to run, and a line that says where the resumed run stands."""
    if resume.dropped_partial:
        c.note(
            f"--resume {resume.path}: its last line was cut short; that record runs again.", quiet
        )
    if resume.previous is None:
        return wanted
    done = wanted & resume.done
    c.note(
        f"Resuming {resume.path}: {len(done)} of {len(wanted)} records of "
        f"{spread.shard_label()} already done; {len(wanted) - len(done)} to run.",
        quiet,
    )
    return frozenset(wanted - done)


def _resumed_report(resume: ResumeFile, report: RunReport | None, info) -> RunReport:
    """The whole file's report: its header, the records this run did not redo, and this run's,
    in the grid's order."""
    previous = resume.previous
    if previous is None:
        return report
    new = [] if report is None else report.results
    redone = frozenset(r.key for r in new)
    records = resume.previous_records(redone) + new
    order = {entry.key: i for i, entry in enumerate(info.jobs)}
    records.sort(key=lambda r: order.get(r.key, len(order)))
    layers = {layer.part: layer for layer in (report.layers if report else [])}
    layers.update({layer.part: layer for layer in previous.layers})
    ranked = sorted(layers, key=lambda k: (k[0] is None, k[0] or 0, k[1] != "prefill"))
    return replace(
        previous,
        results=records,
        layers=[layers[k] for k in ranked],
        grid=info,
        interrupted=bool(report and report.interrupted),
        pareto=None,
    )


def _execute(
    layers, jobs, run, out, spread, info, wanted, resume, columns, target_error, heads=Heads()
) -> RunReport:
    """Run the planned jobs' wanted records, streaming them as they finish; the whole report."""
    streaming = out.fmt == "jsonl" and resume is None
    progress, update = c.progress_printer(out.quiet)
    started: list[RunReport] = []  # the report as it grows, for what to keep if stopped at once

    def write(line: str) -> None:  # a JSONL line, to the stream and to the resume file
        if streaming:
            output.write(line + "\n")
        if resume is not None:
            resume.append(line)

    def on_start(report: RunReport) -> None:
        report.grid = info
        started.append(report)
        if streaming or (resume is not None and resume.is_new):
            write(jsonl_header(report))

    exit_code = 0
    run_jobs = executor(spread.executor)
    with Output(out.output, flush_each=streaming) as output:
        with graceful_stop(lambda line: c.note(line, out.quiet)) as stop:
            try:
                with progress or contextlib.nullcontext():
                    report = run_jobs(
                        layers, config=run, jobs=jobs, only=wanted, on_start=on_start,
                        on_progress=update,
                        should_stop=stop.requested,
                        on_layer=lambda layer: write(jsonl_layer(layer)),
                        on_result=lambda record: write(jsonl_result(record)),
                    )  # fmt: skip
                exit_code = stop.exit_code if report.interrupted else 0
            except KeyboardInterrupt as exc:  # a second signal: stop at once, keep what finished
                if not (started and started[0].results):
                    raise
                report, report.interrupted = started[0], True
                exit_code = 143 if isinstance(exc, Terminated) else 130
        finished = len(report.results)
        if resume is not None:
            report = _resumed_report(resume, report, info)
        if report.interrupted and not report.results:
            output.discard()  # nothing finished: the previous file stays as it was
        else:
            _render(report, out, columns, target_error, streaming, output, heads)
    if report.interrupted:
        if resume is not None:
            c.note(
                f"Interrupted: {resume.path} holds {len(report.results)} finished records "
                f"({finished} from this run); rerun the same command to go on.",
                out.quiet,
            )
            raise typer.Exit(exit_code)
        where = output.label if report.results else f"nothing; {output.label} left as it was"
        c.note(f"Interrupted: kept {len(report.results)} finished records in {where}.", out.quiet)
        raise typer.Exit(exit_code)
    return report


def _render(report, out, columns, target_error, streaming, output=None, heads=Heads()) -> None:
    """The report as ``--format`` asks (a JSONL stream has had its lines already; the Pareto
    picks follow them)."""
    from kdecli.experiments.compare.heads import cheapest_every_head
    from kdecli.experiments.compare.pareto import cheapest_settings
    from kdecli.experiments.compare.report import render_text

    if target_error is not None and not report.interrupted:
        pick = cheapest_every_head if heads.every_head else cheapest_settings
        report.pareto = pick(report.results, target_error)
        if streaming:
            output.write(jsonl_pareto(report.pareto) + "\n")
    if streaming:
        return
    text = render_text(
        report, out.fmt, width=c.table_width(out.output), columns=columns,
        colour=c.colour(out.output), verbose=out.verbose, per_head=heads.per_head,
    )  # fmt: skip
    if output is not None:
        output.write(text)
        return
    with Output(out.output) as fresh:
        fresh.write(text)


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
    per_head: PerHead = False,
    *,
    inputs: InputOptions,
    run: RunConfig,
    out: OutputOptions,
) -> None:
    """Run one method at one budget and report its error and time against exact attention."""
    sweep = Sweep([method], [budget], c.parse_params(param, default_method=method))
    _run(input_spec, inputs, sweep, run, out, heads=Heads(per_head=per_head))


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
@shared_options(inputs=INPUT, run=RUN, out=OUTPUT, spread=SWEEP)
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
    per_head: PerHead = False,
    every_head: EveryHead = False,
    *,
    inputs: InputOptions,
    run: RunConfig,
    out: OutputOptions,
    spread: SweepOptions,
) -> None:
    """Run every method × budget × seed against one exact reference; mean ± std over seeds.

    A grid too large for one machine runs in shards (--num-shards N --shard-id I, each on any
    machine; `kdecli merge` joins their JSONL), resumes after a crash (--resume FILE.jsonl), or
    runs its jobs as Ray tasks (--executor ray)."""
    sweep = Sweep(
        _split_list(methods, "methods"),
        _split_list(budgets, "budgets", int),
        c.parse_params(param),
    )
    _run(
        input_spec, inputs, sweep, run, out, plot=plot, target_error=target_error, spread=spread,
        heads=Heads(per_head, every_head),
    )  # fmt: skip
