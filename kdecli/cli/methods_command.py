"""`kdecli methods [NAME]`: every method, what its budget means, its parameters and defaults."""

from __future__ import annotations

import inspect
import json
import sys
from textwrap import fill, indent
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kdecli.cli import common as c
from kdecli.cli.app import app
from kdecli.cli.options import INPUT, OUTPUT, RUN, OutputOptions, shared_options
from kdecli.errors import UsageError

if TYPE_CHECKING:  # the library (and torch) is imported when the command runs, not for --help
    from kdecli.masks import Mask
    from kdecli.measure.config import RunConfig
    from kdecli.sources import InputOptions


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
    from kdecli.methods.catalog import describe_methods
    from kdecli.sources import load_input

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
    detailed = name is not None or len(entries) == 1
    for entry in entries:
        _render(console, entry, detailed=detailed)
        if detailed:
            _render_math(console, method_math(entry["name"]))
    closing = (
        f"The long form, with every method side by side: {LONG_FORM}."
        if detailed
        else f"`kdecli methods NAME` shows a method's math; the long form is {LONG_FORM}."
    )
    console.print(Text(closing))


LONG_FORM = "docs/methods.md in the kdecli repository"


def method_math(name: str) -> str:
    """The estimator of a registered method, as its docstring states it: the class's own, else
    its module's (a wheel has no docs/ folder, so the math travels with the code)."""
    from kdecli.methods.registry import get_method_class

    cls = get_method_class(name)
    doc = cls.__dict__.get("__doc__") or sys.modules[cls.__module__].__doc__
    if not doc:  # python -OO strips docstrings
        return f"{cls.summary}\n\n(No docstrings in this interpreter: see {LONG_FORM}.)"
    return inspect.cleandoc(doc).replace("``", "`")


def _render_math(console: Console, doc: str) -> None:
    """Prose paragraphs re-wrapped to the terminal; indented blocks (the formulas) kept as written."""
    for paragraph in doc.split("\n\n"):
        if paragraph[:1].isspace():
            # a formula keeps its alignment: past the terminal's width, the terminal wraps it
            console.print(Text(indent(paragraph, "  ")), soft_wrap=True)
        else:
            for item in _items(paragraph):
                _say(console, " ".join(item.split()))
        console.print()


def _items(paragraph: str) -> list[str]:
    """A paragraph with hanging lines (``topk: …`` then indented lines, or a list) is one item
    per unindented line; any other paragraph is one item."""
    lines = paragraph.splitlines()
    if not any(line[:1].isspace() for line in lines[1:]):
        return [paragraph]
    items: list[str] = []
    for line in lines:
        if line[:1].isspace() and items:
            items[-1] += "\n" + line
        else:
            items.append(line)
    return items


def _say(console: Console, text: str) -> None:
    """One field, indented, wrapped at the terminal's width, printed as it is (never as markup)."""
    lines = fill(text, console.width - 1, initial_indent="  ", subsequent_indent="  ")
    console.print(Text(lines), soft_wrap=True)


def _mask(causal: bool, offset: int | None, default_offset: int = 0) -> Mask:
    """The mask the reasons are given under; not checked against the input's shape, so that a
    shape the mask cannot take is one of each method's reasons rather than an error."""
    from kdecli.masks import FULL, Causal

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
    console.print(Text.assemble((e["name"], "bold"), f" — {e['summary']}"))
    _say(console, f"paper: {e['paper']}")
    _say(console, f"budget: {e['budget']}")
    if "params_at_budget" in e:
        for mode, key in (("paper", "params_at_budget"), ("keys", "params_at_keys")):
            mapped = " ".join(f"{k}={v}" for k, v in e[key].items())
            paid = e.get("keys_per_query", {}).get(mode)
            on_input = "" if paid is None else f"  ({paid:.4g} keys per query on this input)"
            _say(console, f"at budget (--budget-mode {mode}): {mapped}{on_input}")
    _say(console, ", ".join(flags))
    if e["cost"]:
        _say(console, f"cost model: {e['cost']}")
    if "reasons" in e:
        status = "; ".join(e["reasons"]) if e["reasons"] else "can run on this input"
        _say(console, f"on this input: {status}")
    if e["params"] and detailed:
        table = Table(show_header=True, box=None, padding=(0, 2))
        for column in ("parameter", "type", "default", "allowed", "meaning"):
            table.add_column(column, overflow="fold")
        for p in e["params"]:
            table.add_row(p["name"], p["type"], str(p["default"]), p["range"], p["help"])
        console.print(table)
    elif e["params"]:
        defaults = ", ".join(f"{p['name']}={p['default']}" for p in e["params"])
        _say(console, f"params: {defaults}")
    console.print()
