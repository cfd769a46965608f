"""What every command shares: option types (defined once), error handling, output and progress."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kdecli.errors import KdecliError, RuntimeFailure, UsageError
from kdecli.files import check_writable

stderr = Console(stderr=True)

# ---- option types, one definition each ---------------------------------------------------------
InputArg = Annotated[
    Optional[str],
    typer.Argument(
        help="file.npz | file.h5[:/group] | file.pt | glove:PATH | synthetic:n=…,d=…,b=…,h=… "
        "(or give --q/--k/--v .npy files).",
        show_default=False,
    ),
]
TargetError = Annotated[
    Optional[float],
    typer.Option(
        "--target-error",
        help="Also show each method's cheapest setting (fewest FLOPs, then time) whose seed-mean "
        "rel_spectral is at most this.",
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
    stderr.print(f"[bold red]Error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    if hint:
        stderr.print(f"Hint: {hint}", highlight=False, soft_wrap=True)


def handle_errors(command: Callable) -> Callable:
    """Map exceptions to one-line messages and exit codes: 2 usage, 1 runtime, 130 interrupted."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KdecliError as exc:
            if debug():
                raise
            error(exc.message, exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("Interrupted.")
            raise typer.Exit(130) from None
        except (MemoryError, getattr(__import__("torch"), "OutOfMemoryError", MemoryError)) as exc:
            if debug():
                raise
            error(
                f"out of memory: {str(exc).splitlines()[0] if str(exc) else 'no detail'}",
                "Use a smaller --n, --batch or budget, or --device cpu.",
            )
            raise typer.Exit(1) from None
        except Exception as exc:
            if debug():
                raise
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


def file_width(path: Path | None) -> int | None:
    """A table written to a file is 160 columns wide; on a terminal it takes the terminal's width."""
    return 160 if path is not None else None


def open_output(path: Path | None):
    """stdout, or the file (created only now); a failed write is a runtime failure."""
    if path is None:
        return _NoClose(sys.stdout)
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise RuntimeFailure(f"cannot write {path}: {exc.strerror}.") from None


class _NoClose:
    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        return self.stream

    def __exit__(self, *exc):
        self.stream.flush()
        return False


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
        progress.update(task, completed=done, total=total, description=label)

    return progress, update


def note(message: str, quiet: bool) -> None:
    if not quiet:
        stderr.print(message, highlight=False, soft_wrap=True)
