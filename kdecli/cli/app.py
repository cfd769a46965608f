"""The Typer application object; each command module in this package adds one command to it.

Light on purpose: building the application and printing ``--help`` or ``--version`` imports no
torch, so they answer at once; command modules import the library that needs it inside their
command functions (``tests/test_cli_surface.py`` checks).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Optional

import typer
from typer.core import TyperGroup


class OneLineErrors(TyperGroup):
    """Typer's group, with the command line's own mistakes (a missing or unknown option, a value
    of the wrong type) reported like every other usage error: ``Error: …`` and a hint on stderr,
    exit code 2, rather than Typer's boxed panel."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        for command in self.commands.values():
            command.help = unwrap(command.help)
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            sys.stderr.write("Aborted.\n")
            sys.exit(1)
        except typer.TyperException as exc:  # click's UsageError, BadParameter, NoSuchOption…
            # With no arguments the group has printed its help already; keep click's exit code.
            if type(exc).__name__ != "NoArgsIsHelpError":
                _usage_error(exc)
            sys.exit(getattr(exc, "exit_code", 2))
        # Not standalone, Typer returns an Exit's code (from a command's handler) as the result.
        sys.exit(result if isinstance(result, int) else 0)


def unwrap(text: str | None) -> str | None:
    """A docstring's paragraphs as single lines, so that help re-wraps them at the terminal's
    width instead of keeping the source's line breaks (Typer keeps them in its command list)."""
    if text is None:
        return None
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _usage_error(exc: typer.TyperException) -> None:
    from kdecli.cli.common import error

    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    message = message.strip()
    if message and message[-1] not in ".?!":
        message += "."
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "kdecli"
    error(message[:1].upper() + message[1:], f"Run `{command} --help` for the options.")


def _show_version(value: bool) -> None:
    if value:
        from kdecli import __version__

        sys.stdout.write(f"kdecli {__version__}\n")
        raise typer.Exit()


app = typer.Typer(
    name="kdecli",
    cls=OneLineErrors,
    help="Measure how far attention approximations are from exact softmax attention, and how much "
    "time they save.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    version: Optional[bool] = typer.Option(
        None,
        "--version",
        help="Print kdecli's version and exit.",
        callback=_show_version,
        is_eager=True,
    ),
) -> None:
    """Measure how far attention approximations are from exact softmax attention, and how much
    time they save."""
