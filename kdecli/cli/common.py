"""What every command shares: option types (defined once), error handling, output and progress."""

from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kdecli.cli.signals import command_started
from kdecli.errors import KdecliError, Terminated, UsageError, first_line, is_out_of_memory
from kdecli.files import check_writable
from kdecli.render.safe import MESSAGE_LIMIT, printable

stderr = Console(stderr=True)

# ---- option types, one definition each ---------------------------------------------------------
InputArg = Annotated[
    Optional[str],
    typer.Argument(
        help="sample:glove (the bundled sample) | file.npz | file.h5[:/group] | file.pt | "
        "glove:PATH | synthetic:n=…,d=…,b=…,h=… | capture.h5:/layer3 (or give --q/--k/--v .npy "
        "files).",
        show_default=False,
    ),
]
TargetError = Annotated[
    Optional[float],
    typer.Option(
        "--target-error",
        help="Also show each method's cheapest setting (fewest FLOPs, then time) whose seed-mean "
        "rel_spectral (rel_frobenius under --reference rows:R) is at most this.",
    ),
]
Params = Annotated[
    Optional[list[str]],
    typer.Option(
        "--param",
        "-p",
        help="key=value (or method.key=value); wins over the budget mapping. Repeatable.",
    ),
]


# ---- errors ------------------------------------------------------------------------------------


def debug() -> bool:
    return os.environ.get("KDECLI_DEBUG", "") not in ("", "0")


def error(message: str, hint: str | None = None) -> None:
    """``Error: message`` on stderr; the message is never read as markup and its control
    characters are escaped (it quotes user text and file content)."""
    message = printable(message, MESSAGE_LIMIT)
    stderr.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        hint = printable(hint, MESSAGE_LIMIT)
        stderr.print(f"Hint: {hint}", highlight=False, markup=False, soft_wrap=True)


def handle_errors(command: Callable) -> Callable:
    """Map exceptions to one-line messages and exit codes: 2 usage, 1 runtime, 130 interrupted."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        command_started()  # from here a signal is this handler's KeyboardInterrupt
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KdecliError as exc:
            if debug():
                raise
            error(exc.message, exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated)
            stderr.print("Terminated." if terminated else "Interrupted.", highlight=False)
            raise typer.Exit(143 if terminated else 130) from None
        except BrokenPipeError:
            # the reader went away (`| head`): say nothing, as other tools do, and stop writing
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(141) from None
        except Exception as exc:
            if debug():
                raise
            if is_out_of_memory(exc):
                error(
                    f"out of memory: {first_line(exc)}",
                    "Use a smaller --n, --batch or budget, or another --device.",
                )
            elif isinstance(exc, OSError):
                where = f"{exc.filename}: " if exc.filename else ""
                error(f"{where}{exc.strerror or exc}.")
            else:
                error(
                    f"unexpected {type(exc).__name__}: {exc}",
                    "Set KDECLI_DEBUG=1 for the traceback, and please report it.",
                )
            raise typer.Exit(1) from None

    return wrapper


# ---- output ------------------------------------------------------------------------------------


def check_format(fmt: str, allowed: tuple[str, ...]) -> str:
    if fmt not in allowed:
        raise UsageError(f"--format must be one of {', '.join(allowed)}; got {fmt!r}.")
    return fmt


def check_output(path: Path | None) -> None:
    """Fail before a long run, not after it, when the output file cannot be written."""
    if path is not None:
        check_writable(path, f"--output {path}")


def table_width(path: Path | None) -> int:
    """A table is 160 columns wide in a file, the terminal's width on one, 200 down a pipe;
    ``COLUMNS`` set in the environment is the width asked for, on a terminal or not."""
    if path is not None:
        return 160
    if os.environ.get("COLUMNS", "").strip().isdigit() or sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return 200


def colour(path: Path | None) -> bool:
    """Colours only on a terminal."""
    return path is None and sys.stdout.isatty()


def parse_params(
    items: list[str] | None, default_method: str | None = None
) -> dict[str, dict[str, Any]]:
    """``key=value`` and ``method.key=value`` -> {method or "*": {key: value}} (values stay strings;
    each method converts and checks its own)."""
    parsed: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param must look like key=value or method.key=value; got {item!r}.")
        method, dot, name = key.rpartition(".")
        target = method if dot else (default_method or "*")
        parsed.setdefault(target, {})[name] = value
    return parsed


def progress_printer(quiet: bool):
    """A rich progress bar on stderr when it is a terminal; otherwise silence.  Returns (ctx, fn)."""
    if quiet or not sys.stderr.isatty():
        return None, None
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    )
    task = progress.add_task("reference", total=None)

    def update(done: int, total: int, label: str) -> None:
        progress.update(task, completed=done, total=total, description=escape(label))

    return progress, update


def note(message: str, quiet: bool) -> None:
    """A line on stderr (unless --quiet), printed as it is: never read as markup, control
    characters escaped."""
    if not quiet:
        message = printable(message, MESSAGE_LIMIT)
        stderr.print(message, highlight=False, markup=False, soft_wrap=True)


def warn(message: str, quiet: bool) -> None:
    if not quiet:
        message = escape(printable(message, MESSAGE_LIMIT))
        stderr.print(f"[yellow]Warning:[/] {message}", highlight=False, soft_wrap=True)
