"""The command line: thin modules over the library, one per command.  Entry point: ``main``."""

from __future__ import annotations

import sys
from signal import SIGTERM

from kdecli.cli.app import app
from kdecli.cli.signals import SignalAtStartUp
from kdecli.errors import Terminated

# Each module adds its command(s) to `app` when imported: this is the order of --help.
# isort: off
from kdecli.cli import run_commands as _run_commands  # noqa: F401  (approx, compare)
from kdecli.cli import methods_command as _methods_command  # noqa: F401
from kdecli.cli import inspect_command as _inspect_command  # noqa: F401
from kdecli.cli import plot_command as _plot_command  # noqa: F401
from kdecli.cli import report_command as _report_command  # noqa: F401
from kdecli.cli import merge_command as _merge_command  # noqa: F401
from kdecli.cli import capture_command as _capture_command  # noqa: F401
from kdecli.cli import drift_command as _drift_command  # noqa: F401
from kdecli.cli import scale_command as _scale_command  # noqa: F401
from kdecli.cli import download_glove as _download_glove  # noqa: F401
# isort: on


def main() -> None:
    try:
        app(prog_name="kdecli")
    except (KeyboardInterrupt, SignalAtStartUp) as exc:  # before a command's own handler
        terminated = isinstance(exc, Terminated) or getattr(exc, "signum", None) == SIGTERM
        sys.stderr.write("Terminated.\n" if terminated else "Interrupted.\n")
        sys.exit(143 if terminated else 130)


__all__ = ["app", "main"]
