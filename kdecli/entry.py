"""The ``kdecli`` command's entry point: process set-up first, then the command line.

Huge pages must be asked for before torch allocates anything, so they are set up before the CLI
(which imports torch) is imported.  SIGTERM is made to behave like Ctrl-C, and either one during
the second or so of start-up (the imports, then Typer's parsing of the command line) ends with one
line and exit 130 or 143, not a traceback.
"""

import sys

from kdecli.tuning import enable_huge_pages


def main() -> None:
    import signal

    enable_huge_pages()
    try:
        signal.signal(signal.SIGTERM, _terminate)
        from kdecli.cli import main as run_cli
        from kdecli.cli.signals import guard_start_up

        guard_start_up()  # Typer's parsing would swallow a KeyboardInterrupt into a silent 130
    except KeyboardInterrupt as exc:
        terminated = type(exc).__name__ == "Terminated"
        sys.stderr.write("Terminated.\n" if terminated else "Interrupted.\n")
        sys.exit(143 if terminated else 130)
    run_cli()


def _terminate(signum, frame) -> None:
    from kdecli.errors import Terminated

    raise Terminated()
