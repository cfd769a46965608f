"""The ``kdecli`` command's entry point: process tuning first, then the command line.

Huge pages must be asked for before torch allocates anything, so this module sets them up before
it imports the CLI (which imports torch).
"""

from kdecli.tuning import enable_huge_pages


def main() -> None:
    enable_huge_pages()
    from kdecli.cli import main as run_cli

    run_cli()
