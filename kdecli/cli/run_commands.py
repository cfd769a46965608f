"""`kdecli approx` and `kdecli compare`: load, run, render.  All logic lives in the library."""

from __future__ import annotations

import contextlib
from typing import Optional

import typer

from kdecli.cli import common as c
from kdecli.cli.app import app
from kdecli.errors import UsageError
from kdecli.inputs import load_input
from kdecli.pareto import check_target_error, cheapest_settings
from kdecli.report import FORMATS, jsonl_header, jsonl_pareto, jsonl_result, render
from kdecli.runner import compare


def _run(
    input_spec, q, k, v, q_key, k_key, v_key, layout, n, batch, methods, budgets, params, seeds,
    seed, device, dtype, scale, causal, repeats, warmup, bound, no_timing, fmt, output, quiet,
    plot=None, target_error=None,
) -> None:
    c.check_format(fmt, FORMATS)
    c.check_output(output)
    if target_error is not None:
        check_target_error(target_error)
        if fmt == "csv":
            c.note("--target-error: the CSV has one row per record and no room for the cheapest "
                   "settings; use --format table, json or jsonl to see them.", quiet)
    if plot is not None:
        from kdecli.plot import check_plot_path

        check_plot_path(plot)
    qkv = load_input(input_spec, q=q, k=k, v=v, q_key=q_key, k_key=k_key, v_key=v_key,
                     layout=layout, n=n, batch=batch)
    progress, update = c.progress_printer(quiet)
    with c.open_output(output) as stream:
        streaming = fmt == "jsonl"
        on_start = (lambda r: (stream.write(jsonl_header(r) + "\n"), stream.flush())) if streaming else None
        on_result = (lambda rec: (stream.write(jsonl_result(rec) + "\n"), stream.flush())) if streaming else None
        with progress or contextlib.nullcontext():
            report = compare(
                qkv, methods, budgets, seeds=seeds, seed=seed, params=params, device=device,
                dtype=dtype, scale=scale, causal=causal, repeats=repeats, warmup=warmup,
                bound=bound, timing=not no_timing, on_start=on_start, on_result=on_result,
                on_progress=update,
            )
        if target_error is not None:
            report.pareto = cheapest_settings(report.results, target_error)
            if streaming:
                stream.write(jsonl_pareto(report.pareto) + "\n")
        if not streaming:
            render(report, fmt, stream, width=160 if output else None)
    if output is not None:
        c.note(f"Wrote {output}.", quiet)
    if plot is not None:
        from kdecli.plot import plot_reports

        plot_reports([report.as_dict()], plot)
        c.note(f"Wrote {plot}.", quiet)


@app.command("approx")
@c.handle_errors
def approx_command(
    input_spec: c.InputArg = None,
    method: str = typer.Option("kdeformer", "--method", "-m", help="A name from `kdecli methods`."),
    budget: int = typer.Option(256, "--budget", "-b", help="Keys or features per query (see `kdecli methods NAME`)."),
    param: c.Params = None,
    q: c.QPath = None, k: c.KPath = None, v: c.VPath = None,
    q_key: c.QKey = None, k_key: c.KKey = None, v_key: c.VKey = None,
    layout: c.Layout = "bhnd", n: c.NOpt = None, batch: c.BatchOpt = None,
    seed: c.Seed = 0, device: c.Device = "auto", dtype: c.DType = None, scale: c.Scale = None,
    causal: c.Causal = False, bound: c.Bound = False, repeats: c.Repeats = 5, warmup: c.Warmup = 1,
    no_timing: c.NoTiming = False, fmt: c.Format = "table", output: c.Output = None,
    quiet: c.Quiet = False,
) -> None:
    """Run one method at one budget and report its error and time against exact attention."""
    params = c.parse_params(param, default_method=method)
    _run(input_spec, q, k, v, q_key, k_key, v_key, layout, n, batch, [method], [budget], params,
         1, seed, device, dtype, scale, causal, repeats, warmup, bound, no_timing, fmt, output, quiet)


def _split_list(text: str, what: str, convert=str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"--{what} is empty.")
    try:
        return [convert(item) for item in items]
    except ValueError:
        raise UsageError(f"--{what} must be a comma-separated list of integers; got {text!r}.") from None


@app.command("compare")
@c.handle_errors
def compare_command(
    input_spec: c.InputArg = None,
    methods: str = typer.Option("exact,kdeformer,performer,reformer,scatterbrain", "--methods",
                                help="Comma-separated method names."),
    budgets: str = typer.Option("64,128,256,512", "--budgets", help="Comma-separated budgets."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds per randomized method × budget."),
    param: c.Params = None,
    q: c.QPath = None, k: c.KPath = None, v: c.VPath = None,
    q_key: c.QKey = None, k_key: c.KKey = None, v_key: c.VKey = None,
    layout: c.Layout = "bhnd", n: c.NOpt = None, batch: c.BatchOpt = None,
    seed: c.Seed = 0, device: c.Device = "auto", dtype: c.DType = None, scale: c.Scale = None,
    causal: c.Causal = False, bound: c.Bound = False, repeats: c.Repeats = 3, warmup: c.Warmup = 1,
    no_timing: c.NoTiming = False, fmt: c.Format = "table", output: c.Output = None,
    quiet: c.Quiet = False,
    plot: str = typer.Option(None, "--plot", help="Also draw the error curves to this image file."),
    target_error: Optional[float] = typer.Option(
        None, "--target-error", help="Also show each method's cheapest setting (fewest FLOPs, then "
        "time) whose seed-mean rel_spectral is at most this."),
) -> None:
    """Run every method × budget × seed against one exact reference; mean ± std over seeds."""
    method_list = _split_list(methods, "methods")
    budget_list = _split_list(budgets, "budgets", int)
    params = c.parse_params(param)
    _run(input_spec, q, k, v, q_key, k_key, v_key, layout, n, batch, method_list, budget_list,
         params, seeds, seed, device, dtype, scale, causal, repeats, warmup, bound, no_timing, fmt,
         output, quiet, plot=plot, target_error=target_error)
