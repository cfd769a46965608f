"""`kdecli download-glove`: fetch a Stanford GloVe archive and build its binary cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from kdecli.cli import common as c
from kdecli.cli.app import app
from kdecli.cli.options import OUTPUT, OutputOptions, shared_options
from kdecli.errors import Terminated


class RichProgress:
    """`kdecli.download.Progress` drawn as a rich bar on stderr: bytes, speed, ETA; hidden when not a terminal."""

    def __init__(self, console: Console, *, show_bar: bool, show_notes: bool):
        self.console, self.show_notes = console, show_notes
        self.bar = Progress(
            TextColumn("{task.description}", markup=False),  # file names are not markup
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not show_bar,
        )
        self.task = None

    def __enter__(self) -> RichProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def start(self, description: str, total: int | None, completed: int = 0) -> None:
        if self.task is not None:
            self.bar.stop_task(self.task)
        self.task = self.bar.add_task(description, total=total, completed=completed)

    def advance(self, amount: int) -> None:
        if self.task is not None:
            self.bar.advance(self.task, amount)

    def note(self, message: str) -> None:
        if self.show_notes:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)


@app.command("download-glove")
@c.handle_errors
@shared_options(out=OUTPUT.only("quiet"))
def download_glove(
    corpus: Annotated[
        str, typer.Option(help="GloVe corpus: 6B, twitter.27B, 42B or 840B.")
    ] = "twitter.27B",
    dim: Annotated[
        int,
        typer.Option(
            help="Vector width (6B: 50/100/200/300; twitter.27B: 25/50/100/200; 42B, 840B: 300)."
        ),
    ] = 100,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Cache folder [default: $KDECLI_CACHE_DIR, else $XDG_CACHE_HOME/kdecli or ~/.cache/kdecli].",
            show_default=False,
        ),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            help="Download the archive from this mirror instead of Stanford.", show_default=False
        ),
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option(
            help="Use this archive (.zip) or glove.*.txt already on disk.", show_default=False
        ),
    ] = None,
    sha256: Annotated[
        str | None, typer.Option(help="Expected SHA-256 of the archive.", show_default=False)
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Download and convert again even if the cache has it.")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            help="Check the cache files and the archive against the SHA-256 digests written with "
            "them (NAME.sha256); rebuild what fails."
        ),
    ] = False,
    *,
    out: OutputOptions,
) -> None:
    """Download a Stanford GloVe archive (resumable, verified) and convert one dim to a binary cache.

    Prints the path of the cache file (.npy) on stdout; use it as `glove:PATH`, or give
    `glove:6B.50d` style names to the other commands.  A broken transfer is retried (5 times in a
    row, waiting 1 to 16 s) and resumed; a second run into the same cache waits for the first.
    """
    from kdecli.sources import glove_cache  # imports torch: when the command runs, not for --help

    console = Console(stderr=True)
    quiet = out.quiet
    reporter = RichProgress(
        console, show_bar=not quiet and console.is_terminal, show_notes=not quiet
    )
    try:
        with reporter:
            result = glove_cache.download_glove(
                corpus,
                dim,
                cache_dir=cache_dir,
                url=url,
                from_file=from_file,
                sha256=sha256,
                force=force,
                verify=verify,
                progress=reporter,
            )
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated): the README's 130 / 143
        word = "Terminated" if isinstance(exc, Terminated) else "Interrupted"
        console.print(
            f"{word}. Any partial download is kept; run the same command again to resume.",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
    if not result.downloaded and not result.converted:
        reporter.note(
            f"GloVe {result.corpus} {result.dim}d is already in the cache; nothing to download."
        )
    elif result.converted:
        reporter.note(f"Converted {result.rows:,} vectors of width {result.dim}.")
    typer.echo(str(result.vectors_path))
