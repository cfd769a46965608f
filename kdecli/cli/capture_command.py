"""`kdecli capture MODEL --text FILE -o OUT.h5`: each layer's q, k, v and o from a local model."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from kdecli.cli import common as c
from kdecli.cli.app import app
from kdecli.cli.options import OUTPUT, RUN, OutputOptions, shared_options
from kdecli.errors import UsageError

if TYPE_CHECKING:  # the library (and torch) is imported when the command runs, not for --help
    from kdecli.measure.config import RunConfig

CAPTURE_SUFFIXES = (".h5", ".hdf5")


@app.command("capture")
@c.handle_errors
@shared_options(
    run=RUN.only("device", "dtype"),
    out=OUTPUT.only("output", "quiet"),
    helps={
        "output": "The HDF5 file to write (required).",
        "dtype": "float32 | float64 | float16 | bfloat16: the model's working precision "
        "(default float32).",
    },
)
def capture_command(
    model: str = typer.Argument(
        ...,
        help="A local model folder (config.json and safetensors, as save_pretrained writes it) "
        "or a .gguf file; its tokenizer is read from beside it. Nothing is downloaded.",
        show_default=False,
    ),
    text: Path = typer.Option(
        ..., "--text", help="A UTF-8 text file, tokenized once.", show_default=False
    ),
    tokens: int = typer.Option(512, "--tokens", help="N: tokens per chunk."),
    chunks: int = typer.Option(1, "--chunks", help="K: chunks of N tokens (the batch)."),
    layers: Optional[str] = typer.Option(
        None, "--layers", help="Layers to capture, e.g. 0,3-5 (default: all)."
    ),
    *,
    run: RunConfig,
    out: OutputOptions,
) -> None:
    """Run a Hugging Face model over K chunks of N tokens of a text and record, per layer, the
    q, k, v its attention receives (after RoPE; GQA expanded) and its own output o, with the
    layer's scale and causal flag.  `kdecli compare FILE.h5:/layer3` reads one layer back."""
    if out.output is None:
        raise UsageError("capture needs --output OUT.h5.")
    if out.output.suffix.lower() not in CAPTURE_SUFFIXES:
        # an HDF5 file under another name is read back as no capture at all
        raise UsageError(
            f"--output {out.output}: a capture is an HDF5 file; give a name ending in "
            f"{' or '.join(CAPTURE_SUFFIXES)}."
        )
    from kdecli.hf.capturing import capture

    progress, update = c.progress_printer(out.quiet)
    with progress or contextlib.nullcontext():
        summary = capture(
            model,
            text,
            tokens=tokens,
            chunks=chunks,
            layers=layers,
            dtype=run.dtype,
            device=run.device,
            output=out.output,
            progress=update,
        )
    c.note(
        f"Wrote {summary.path}: {len(summary.layers)} layers × {summary.chunks} chunks × "
        f"{summary.tokens} tokens, {summary.bytes / 2**20:.1f} MiB in {summary.seconds:.1f} s.",
        out.quiet,
    )
