"""`kdecli inspect INPUT`: shapes, norms, logit range, attention entropy and overflow risk per head."""

from __future__ import annotations

import typer

from kdecli.cli import common as c
from kdecli.cli.app import app
from kdecli.inputs import load_input
from kdecli.inspect import FORMATS, inspect_input, render


@app.command("inspect")
@c.handle_errors
def inspect_command(
    input_spec: c.InputArg = None,
    q: c.QPath = None, k: c.KPath = None, v: c.VPath = None,
    q_key: c.QKey = None, k_key: c.KKey = None, v_key: c.VKey = None,
    layout: c.Layout = "bhnd", n: c.NOpt = None, batch: c.BatchOpt = None,
    device: c.Device = "auto", scale: c.Scale = None, causal: c.Causal = False,
    fmt: str = typer.Option("table", "--format", "-f", help="table | json."), output: c.Output = None, quiet: c.Quiet = False,
) -> None:
    """Per batch×head slice: norms of Q, K, V, logit range, attention entropy and top-1% mass,
    ‖O‖₂ against ‖D⁻¹A‖₂‖V‖₂, and exp overflow risk (all in float64, chunked)."""
    c.check_format(fmt, FORMATS)
    c.check_output(output)
    qkv = load_input(input_spec, q=q, k=k, v=v, q_key=q_key, k_key=k_key, v_key=v_key,
                     layout=layout, n=n, batch=batch)
    doc = inspect_input(qkv, scale=scale, causal=causal, device=device)
    with c.open_output(output) as stream:
        render(doc, fmt, stream, width=160 if output else None)
    for warning in doc["warnings"]:
        c.note(f"[yellow]Warning:[/] {warning}", quiet)
    if output is not None:
        c.note(f"Wrote {output}.", quiet)
