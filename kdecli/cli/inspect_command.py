"""`kdecli inspect INPUT`: shapes, norms, logit range, attention entropy and overflow risk per head."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from kdecli.cli import common as c
from kdecli.cli.app import app
from kdecli.cli.options import INPUT, OUTPUT, RUN, OutputOptions, shared_options
from kdecli.files import Output

if TYPE_CHECKING:  # the library (and torch) is imported when the command runs, not for --help
    from kdecli.measure.config import RunConfig
    from kdecli.sources import InputOptions


@app.command("inspect")
@c.handle_errors
@shared_options(
    inputs=INPUT.without("all_layers"),
    run=RUN.only("device", "scale", "causal", "query_offset"),
    out=OUTPUT.without("columns", "verbose"),
    helps={"fmt": "table | json."},
)
def inspect_command(
    input_spec: c.InputArg = None, *, inputs: InputOptions, run: RunConfig, out: OutputOptions
) -> None:
    """Per batch×head slice: norms of Q, K, V, logit range, attention entropy and top-1% mass,
    ‖O‖₂ against ‖D⁻¹A‖₂‖V‖₂, and exp overflow risk (all in float64, chunked)."""
    from kdecli.experiments.inspect import FORMATS, inspect_input, render
    from kdecli.sources import load_input

    c.check_format(out.fmt, FORMATS)
    c.check_output(out.output)
    qkv = load_input(input_spec, inputs)
    doc = inspect_input(
        qkv,
        scale=run.scale,
        causal=qkv.causal(run.causal),
        query_offset=run.query_offset,
        device=run.device,
    )
    buffer = io.StringIO()
    render(doc, out.fmt, buffer, width=c.table_width(out.output))
    with Output(out.output) as output:
        output.write(buffer.getvalue())
    for warning in doc["warnings"]:
        c.warn(warning, out.quiet)
    if out.output is not None:
        c.note(f"Wrote {out.output}.", out.quiet)
