"""`kdecli drift MODEL --text FILE --methods ... --budgets ...`: an approximation inside a model."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from kdecli.cli import common as c
from kdecli.cli.app import app
from kdecli.cli.options import OUTPUT, RUN, OutputOptions, shared_options
from kdecli.cli.run_commands import _split_list
from kdecli.files import Output

if TYPE_CHECKING:  # the library (and torch) is imported when the command runs, not for --help
    from kdecli.measure.config import RunConfig

# kdecli.experiments.drift.report.FORMATS, here so that `kdecli --help`
# does not import rich tables
FORMATS = ("table", "json", "csv", "markdown")


@app.command("drift")
@c.handle_errors
@shared_options(
    run=RUN.only("seeds", "seed", "device", "dtype", "repeats", "warmup", "timing"),
    out=OUTPUT.only("fmt", "output", "quiet", "columns"),
    helps={
        "fmt": "table | json | csv | markdown.",
        "dtype": "float32 | float64 | float16 | bfloat16: the model's working precision "
        "(default float32).",
        "repeats": "Timed forwards per setting (median reported).",
    },
)
def drift_command(
    model: str = typer.Argument(
        ...,
        help="A local model folder (config.json and safetensors) or a .gguf file; its tokenizer "
        "is read from beside it. Nothing is downloaded.",
        show_default=False,
    ),
    text: Path = typer.Option(
        ..., "--text", help="A UTF-8 text file, tokenized once.", show_default=False
    ),
    methods: str = typer.Option(
        "kdeformer,performer", "--methods", help="Comma-separated method names."
    ),
    budgets: str = typer.Option("64,128", "--budgets", help="Comma-separated budgets."),
    layers: Optional[str] = typer.Option(
        None, "--layers", help="Layers to run the methods in, e.g. 0,3-5 (default: all)."
    ),
    tokens: int = typer.Option(512, "--tokens", help="N: tokens per chunk."),
    chunks: int = typer.Option(1, "--chunks", help="K: chunks of N tokens."),
    generate: Optional[int] = typer.Option(
        None,
        "--generate",
        help="T: generate T tokens greedily after each chunk, with exact attention and with each "
        "method, and compare them (first divergence, token agreement, teacher-forced KL, top-1 "
        "and perplexity per step). Causal LMs only.",
        show_default=False,
    ),
    phase: Optional[str] = typer.Option(
        None,
        "--phase",
        help="With --generate: where the method runs: decode (calls with a KV cache; the "
        "default) | prefill (the prompt's forward) | both.",
        show_default=False,
    ),
    param: c.Params = None,
    *,
    run: RunConfig,
    out: OutputOptions,
) -> None:
    """Run a model with exact attention and with each method × budget × seed in the chosen
    layers, on the same tokens: hidden-state drift per layer, and KL, top-1 agreement and
    perplexity (causal LMs) or embedding cosine (encoders), beside the `mean` baseline's; with
    --generate, what the method does to a greedy generation."""
    from kdecli.experiments.drift.report import parse_columns, render_text

    c.check_format(out.fmt, FORMATS)
    columns = parse_columns(out.columns)  # before the run, not after it
    c.check_output(out.output)  # (`run` was checked when it was made, before any of this)
    method_list = _split_list(methods, "methods")
    params = c.parse_params(param)
    shared = params.pop("*", {})
    from kdecli.methods import get_method_class

    for name in method_list:  # a bare key=value goes to every method that has that parameter
        own = {
            k: v for k, v in shared.items() if k in {p.name for p in get_method_class(name).params}
        }
        if own:
            params[name] = {**own, **params.get(name, {})}
    from kdecli.experiments.drift.run import drift

    progress, update = c.progress_printer(out.quiet)
    with progress or contextlib.nullcontext():
        report = drift(
            model, text, method_list, _split_list(budgets, "budgets", int),
            layers=layers, seeds=[run.seed + i for i in range(run.seeds)], tokens=tokens,
            chunks=chunks, device=run.device, dtype=run.dtype, params=params,
            timing=run.timing, repeats=run.repeats, warmup=run.warmup, progress=update,
            generate=generate, phase=phase,
        )  # fmt: skip
    with Output(out.output) as output:
        output.write(
            render_text(
                report,
                out.fmt,
                width=c.table_width(out.output),
                columns=columns,
                colour=c.colour(out.output),
            )
        )
    failed = [r for r in report.results if not r.ok]
    for r in failed:
        c.warn(f"{r.method} (budget {r.budget}): {r.status}: {r.reason}", out.quiet)
    coupled = [m for m in method_list if get_method_class(m).causal_query_coupled]
    prefill = report.phase in (None, "prefill", "both")  # one decode query groups with no other
    if report.model.output == "next-token" and coupled and prefill:
        c.warn(
            f"{', '.join(coupled)}: causally, a full block groups its queries, so a later token's "
            "query can move an earlier position's output (no later key reaches it); their "
            "perplexity and KL may read slightly optimistic.",
            out.quiet,
        )
    if out.output is not None:
        c.note(f"Wrote {out.output}.", out.quiet)
