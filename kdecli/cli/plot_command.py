"""`kdecli plot FILES...`: draw the documents kdecli writes (compare, merged, scale, drift)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kdecli.cli import common as c
from kdecli.cli.app import app
from kdecli.cli.options import OUTPUT, OutputOptions, shared_options
from kdecli.experiments.views import plot_documents


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
        help="Documents of `kdecli compare` or `merge` (JSON or JSONL; several are drawn "
        "together, labelled by device and dtype), or one of `kdecli scale` or `kdecli drift`.",
        show_default=False,
    ),
    x: Optional[str] = typer.Option(
        None,
        "--x",
        help="compare: budget (default) | time | flops, or several comma-separated (one panel "
        "each); or layer (runs over a capture's layers); or head (each head's error; a layer × "
        "head heat map for runs over layers). drift: budget (default) | layer | step "
        "(a --generate run's per-step curves). "
        "scale: n (always).",
        show_default=False,
    ),
    y: Optional[str] = typer.Option(
        None,
        "--y",
        help="compare: rel_spectral (default) | rel_frobenius | max_row_rel | bound_normalized "
        "(needs compare --bound). drift: kl (default, next-token models) | cosine (default, "
        "embedding models) | top1 | perplexity | hidden_max | hidden_last; a --generate run also "
        "first_divergence | token_agreement.",
        show_default=False,
    ),
    *,
    out: OutputOptions,
) -> None:
    """Draw error against budget, time or FLOPs: one line per method, seeds as a band, floors.
    A `kdecli scale` document draws time and error against n on log axes; a `kdecli drift`
    document the model's drift against budget (or, --x layer, against layer)."""
    written = plot_documents(results, out.output, x, y)
    c.note(f"Wrote {written}.", out.quiet)
