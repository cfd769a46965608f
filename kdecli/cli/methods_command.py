"""`kdecli methods [NAME]`: every method, what its budget means, its parameters and defaults."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from kdecli.cli import common as c
from kdecli.cli.app import app
from kdecli.cli.options import INPUT, OUTPUT, RUN, OutputOptions, shared_options
from kdecli.errors import UsageError
from kdecli.masks import FULL, Causal, Mask
from kdecli.measure.config import RunConfig
from kdecli.methods.catalog import describe_methods
from kdecli.sources import InputOptions, load_input


@app.command("methods")
@c.handle_errors
@shared_options(
    inputs=INPUT.without("all_layers"),
    run=RUN.only("causal", "query_offset"),
    out=OUTPUT.only("fmt"),
    helps={"fmt": "table | json."},
)
def methods_command(
    name: Optional[str] = typer.Argument(None, help="Show one method only."),
    input_spec: Optional[str] = typer.Option(
        None,
        "--input",
        "-i",
        help="Also say why each method cannot run on this INPUT (or on --q/--k/--v).",
    ),
    budget: int = typer.Option(
        256, "--budget", "-b", help="Budget used for --input checks and the mapping shown."
    ),
    *,
    inputs: InputOptions,
    run: RunConfig,
    out: OutputOptions,
) -> None:
    """List every method: summary, paper, budget mapping, parameters, capabilities."""
    c.check_format(out.fmt, ("table", "json"))
    tensors, mask = {}, _mask(bool(run.causal), run.query_offset)
    if input_spec is not None or inputs.q or inputs.k or inputs.v:
        qkv = load_input(input_spec, inputs)
        tensors = {"q": qkv.q, "k": qkv.k, "v": qkv.v}
        n_q, n_k = qkv.q.shape[-2], qkv.k.shape[-2]
        mask = _mask(qkv.causal(run.causal), run.query_offset, max(n_k - n_q, 0))
    entries = describe_methods([name] if name else None, budget=budget, mask=mask, **tensors)
    if out.fmt == "json":
        sys.stdout.write(json.dumps(entries if name is None else entries[0], indent=2) + "\n")
        return
    console = Console()
    for entry in entries:
        _render(console, entry, detailed=name is not None or len(entries) == 1)


def _mask(causal: bool, offset: int | None, default_offset: int = 0) -> Mask:
    """The mask the reasons are given under; not checked against the input's shape, so that a
    shape the mask cannot take is one of each method's reasons rather than an error."""
    if not causal:
        if offset is not None:
            raise UsageError("--query-offset places queries under a causal mask; add --causal.")
        return FULL
    return Causal(default_offset if offset is None else offset)


def _render(console: Console, e: dict, detailed: bool) -> None:
    flags = [
        "randomized" if e["randomized"] else "deterministic",
        "Q≠K lengths ok" if e["supports_cross"] else "self-attention only",
        {
            "native": "causal ok",
            "decomposition": "causal by the recursive decomposition",
        }.get(e["causal_mode"], "no causal"),
        "autograd ok" if e["supports_grad"] else "no autograd",
    ]
    if e["role"] == "oracle":
        flags.insert(0, "ORACLE (analysis only, reads exact attention)")
    console.print(f"[bold]{e['name']}[/] — {e['summary']}", highlight=False)
    console.print(f"  paper: {e['paper']}", highlight=False)
    console.print(f"  budget: {e['budget']}", highlight=False)
    if "params_at_budget" in e:
        for mode, key in (("paper", "params_at_budget"), ("keys", "params_at_keys")):
            mapped = " ".join(f"{k}={v}" for k, v in e[key].items())
            paid = e.get("keys_per_query", {}).get(mode)
            on_input = "" if paid is None else f"  ({paid:.4g} keys per query on this input)"
            console.print(
                f"  at budget (--budget-mode {mode}): {mapped}{on_input}", highlight=False
            )
    console.print(f"  {', '.join(flags)}", highlight=False)
    if e["cost"]:
        console.print(f"  cost model: {e['cost']}", highlight=False)
    if "reasons" in e:
        status = "; ".join(e["reasons"]) if e["reasons"] else "can run on this input"
        console.print(f"  on this input: {status}", highlight=False)
    if e["params"] and detailed:
        table = Table(show_header=True, box=None, padding=(0, 2))
        for column in ("parameter", "type", "default", "allowed", "meaning"):
            table.add_column(column, overflow="fold")
        for p in e["params"]:
            table.add_row(p["name"], p["type"], str(p["default"]), p["range"], p["help"])
        console.print(table)
    elif e["params"]:
        console.print(
            "  params: " + ", ".join(f"{p['name']}={p['default']}" for p in e["params"]),
            highlight=False,
        )
    console.print()
