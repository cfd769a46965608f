"""What every kdecli figure shares: matplotlib on demand, image paths, colours, axes, saving.

- Matplotlib is optional (``pip install 'kdecli[plot]'``) and draws headless: figures are built
  from ``matplotlib.figure.Figure`` (the Agg canvas, no display, no pyplot state).
- An image path is checked before any work (suffix, folder, permission) and the image is written
  whole: drawn to a temporary file beside it and renamed into place.
- A method keeps one colour on every panel of a figure; floors are grey, dashed (the ``mean``
  baseline) or dotted (the zero output); exact attention is black.
- The y axis turns logarithmic when the positive values span more than one decade.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kdecli.errors import UsageError
from kdecli.files import atomic_path, check_writable, write_failure

SUFFIXES = (".png", ".svg", ".pdf")
DPI = 150
FLOOR = {"color": "0.35", "linestyle": "--", "linewidth": 1, "gid": "floor"}
ZERO = {"color": "0.35", "linestyle": ":", "linewidth": 1, "gid": "floor"}
BAND_ALPHA = 0.18


def require_matplotlib():
    """The ``matplotlib`` module, or a UsageError that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            "plotting needs matplotlib, which is not installed.", hint="pip install 'kdecli[plot]'"
        ) from None
    return matplotlib


def check_plot_path(path: str | os.PathLike) -> Path:
    """Refuse an image path that cannot be written, before a long run rather than after it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(
            f"{path}: cannot write a {suffix or 'suffix-less'} image; "
            f"give a file name ending in {', '.join(SUFFIXES)}."
        )
    check_writable(path, str(path))
    require_matplotlib()
    return path


def new_figure(width: float, height: float):
    """An empty headless Figure laid out so legends outside the axes stay in the image."""
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` (format from its suffix) whole or not at all; return the path."""
    path = check_plot_path(path)
    try:  # drawn to a temporary file beside it, renamed into place when complete
        with atomic_path(path) as partial:
            fig.savefig(partial, dpi=DPI, bbox_inches="tight", format=path.suffix[1:].lower())
    except OSError as exc:
        raise write_failure(str(path), exc) from None
    return path


def method_colours(methods: Iterable[str]) -> dict[str, str]:
    """One colour per method, in order of first appearance (matplotlib's ten-colour cycle)."""
    return {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(methods))}


def log_if_spread(ax: Any, values: Iterable[float], axis: str = "y") -> bool:
    """Make ``axis`` logarithmic when its positive values span more than a decade (zeros and
    negatives are masked rather than drawn at the bottom); return whether it did."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) > 10 * min(positive):
        getattr(ax, f"set_{axis}scale")("log", nonpositive="mask")
        return True
    return False


def shared_legend(fig: Any, axes: Iterable[Any]) -> None:
    """One legend right of the panels, each label once (the first panel's handle)."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize="small")


def caption(fig: Any, text: str, width: int = 105) -> None:
    """The figure's caption under the panels, wrapped to ``width`` characters."""
    import textwrap

    fig.text(0.01, -0.01, "\n".join(textwrap.wrap(text, width)), ha="left", va="top",
             fontsize="small", gid="caption")  # fmt: skip
