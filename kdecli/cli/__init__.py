"""The command line: thin modules over the library, one per command.  Entry point: ``main``."""

from __future__ import annotations

import importlib

from kdecli.cli.app import app

# Commands register themselves on `app` when imported; the order here is the order of --help.
for _module in ("run_commands", "methods_command", "inspect_command", "download_glove", "plot_command"):
    try:
        importlib.import_module(f"kdecli.cli.{_module}")
    except ModuleNotFoundError as exc:  # a command still being written must not break the others
        if exc.name != f"kdecli.cli.{_module}":
            raise


def main() -> None:
    app(prog_name="kdecli")


__all__ = ["app", "main"]
