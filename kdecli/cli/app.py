"""The Typer application object; each command module in this package adds one command to it."""

import typer

app = typer.Typer(
    name="kdecli",
    help="Measure how far attention approximations are from exact softmax attention, and how much "
    "time they save.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
