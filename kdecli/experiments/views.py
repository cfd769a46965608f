"""What ``kdecli report`` and ``kdecli plot`` do with each kind of document: one ``View`` per kind.

A document is read by ``kdecli.experiments.documents.load_any`` into its typed report
(``RunReport``, ``ScaleReport`` or ``DriftReport``); ``view_of(report)`` gives the kind's formats,
its ``--columns`` parser, its text renderer and its figure, so the commands never branch on a kind
themselves.  ``render_document`` and ``plot_documents`` are the two commands as library calls.
The renderers and figures are imported when first used (rich tables and matplotlib
are not needed to read a document).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdecli.errors import UsageError
from kdecli.experiments.compare.records import RunReport
from kdecli.experiments.documents import load_any
from kdecli.experiments.drift.records import DriftReport
from kdecli.experiments.scale.records import ScaleReport

# Every format a document can be rendered in; each kind takes the ones its View lists.
REPORT_FORMATS = ("table", "markdown", "csv", "json", "jsonl")


def default_image(first: Path, x: str, y: str) -> Path:
    """results.json -> results-rel_spectral-vs-budget.png, next to it."""
    return first.with_name(f"{first.stem}-{y}-vs-{x.replace(',', '-')}.png")


def _plot_compare(reports, files, output, x, y) -> Path:
    from kdecli.experiments.compare.plot import plot_reports

    x, y = x or "budget", y or "rel_spectral"
    path = output or default_image(files[0], x, y)
    return plot_reports(reports, path, x=x, y=y, names=[Path(f).name for f in files])


def _plot_scale(reports, files, output, x, y) -> Path:
    from kdecli.experiments.scale.plot import plot_scale

    if x not in (None, "n") or y is not None:
        raise UsageError("a scale document draws time and error against n: no --x or --y.")
    return plot_scale(reports[0], output or default_image(files[0], "n", "time"))


def _plot_drift(reports, files, output, x, y) -> Path:
    from kdecli.experiments.drift.plot import default_y, plot_drift

    x = x or "budget"
    y = y or ("hidden" if x == "layer" else default_y(reports[0]))
    return plot_drift(reports[0], output or default_image(files[0], x, y), x=x, y=y)


@dataclass(frozen=True)
class View:
    """One kind of document: how it is named, rendered and drawn.

    ``report_module`` offers ``render_text(report, fmt, *, width, columns, colour) -> str`` and
    ``parse_columns(text)``; ``plot(reports, files, output, x, y)`` draws the reports read from
    ``files`` to ``output`` (None: an image named after the first file and the axes), ``x`` and
    ``y`` None for the kind's defaults."""

    kind: str
    formats: tuple[str, ...]
    report_module: str
    plot: Callable[..., Path]
    plots_together: bool  # several documents of this kind can share one figure
    verbose: bool = False  # its table takes ``verbose`` (``--verbose``: resolved parameters)

    def _report(self):
        return importlib.import_module(self.report_module)

    def check_format(self, fmt: str, where: str) -> None:
        if fmt not in self.formats:
            raise UsageError(
                f"{where}: a {self.kind} document is rendered as {', '.join(self.formats)}; "
                f"got --format {fmt}."
            )

    def parse_columns(self, text: str | None) -> tuple[str, ...] | None:
        """``--columns`` against this kind's table (the message lists its columns)."""
        return self._report().parse_columns(text)

    def render_text(self, report: Any, fmt: str, **options: Any) -> str:
        if not self.verbose:
            options.pop("verbose", None)  # nothing more to show
        return self._report().render_text(report, fmt, **options)


VIEWS: dict[type, View] = {
    RunReport: View(
        "compare", REPORT_FORMATS, "kdecli.experiments.compare.report", _plot_compare, True,
        verbose=True,
    ),
    ScaleReport: View(
        "scale", ("table", "markdown", "csv", "json"), "kdecli.experiments.scale.report",
        _plot_scale, False,
    ),
    DriftReport: View(
        "drift", ("table", "markdown", "csv", "json"), "kdecli.experiments.drift.report",
        _plot_drift, False,
    ),
}  # fmt: skip


def view_of(report: Any) -> View:
    """The ``View`` of a typed report (``RunReport``, ``ScaleReport`` or ``DriftReport``)."""
    try:
        return VIEWS[type(report)]
    except KeyError:
        kinds = ", ".join(view.kind for view in VIEWS.values())
        raise TypeError(f"not a kdecli report ({kinds}): {type(report).__name__}") from None


def load_report(path: str | os.PathLike) -> tuple[Any, View]:
    """Read any kdecli document and return its typed report and its ``View``."""
    report = load_any(path)
    return report, view_of(report)


def render_document(path: str | os.PathLike, fmt: str = "table", **options: Any) -> str:
    """``kdecli report PATH``: any document rendered as ``fmt`` (one of its view's formats);
    ``options``: ``width``, ``columns`` (a ``--columns`` string), ``colour``, ``verbose``."""
    report, view = load_report(path)
    view.check_format(fmt, str(path))
    columns = view.parse_columns(options.pop("columns", None))
    return view.render_text(report, fmt, columns=columns, **options)


def plot_documents(
    files: Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    x: str | None = None,
    y: str | None = None,
) -> Path:
    """``kdecli plot FILES``: draw documents of one kind (several compare results together; one
    scale or drift document) to ``output`` and return the image's path."""
    loaded = [load_report(path) for path in files]
    kinds = list(dict.fromkeys(view.kind for _, view in loaded))
    if x == "n" and kinds != ["scale"]:
        raise UsageError("--x n draws one `kdecli scale --format json` document.")
    if len(kinds) > 1:
        raise UsageError(
            f"plot draws documents of one kind together; got {', '.join(kinds)}.",
            hint="Draw each kind to its own image.",
        )
    view = loaded[0][1]
    if len(loaded) > 1 and not view.plots_together:
        raise UsageError(f"plot draws one {view.kind} document at a time; got {len(loaded)}.")
    reports = [report for report, _ in loaded]
    return view.plot(reports, [Path(f) for f in files], output and Path(output), x, y)
