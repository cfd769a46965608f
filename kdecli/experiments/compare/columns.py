"""The columns of the ``compare`` table: what each shows of a ``Setting``, and which are shown.

One row per setting (method × budget × parameters, seeds aggregated: mean ± std of each record's
slice-mean).  The method, budget, the primary metric's mean ± std, time, speed-up and status are
always shown; the other columns join, in the order of ``OPTIONAL``, while they fit the width
(``kdecli.render.table``).  A column for a metric no row has, the layer column of a run that is
not over a capture's layers, the phase column of a run of one phase and the forward + backward
columns of a run without ``--backward`` do
not exist for that table.  Under a row-sampled reference rel_frobenius leads, since rel_spectral
cannot be measured on a sample of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kdecli.experiments.compare.aggregate import Setting, primary_metric
from kdecli.measure.metrics import METRICS
from kdecli.render import table
from kdecli.render.cells import MISSING, fmt_flops, fmt_speedup, fmt_time
from kdecli.render.table import Column, Layout

PRIMARY = "rel_spectral"
# The diagnostics (``--diagnostics``): (column, figure, header, Markdown header).  Shown only when
# ``--columns`` names them (or ``all``), never chosen by width: the quick start keeps its columns.
DIAGNOSTIC = (
    ("density", "density", "density", None),
    ("recall", "mass_recall", "mass\nrecall", "mass recall"),
    ("sel_err", "selection_error", "select.\nerror", "selection error"),
    ("est_err", "estimation_error", "estim.\nerror", "estimation error"),
    ("lse_err", "lse_error", "lse\nerror", "lse error"),
)
DIAGNOSTIC_COLUMNS = tuple(key for key, *_ in DIAGNOSTIC)
# The status column wraps (its text is a sentence); an optional column joins only if status keeps
# this much room, enough for "ok · not below mean floor" on one line.
STATUS_ROOM = 25
NOT_AVAILABLE = "n/a (rows)"  # a metric a row-sampled reference cannot give (rel_spectral)
LOWER_BOUND = "≥ "  # a max over sampled rows: the true max is at least this
EXTRAPOLATED = "≈"  # marks an exact time (and the speed-up over it) scaled from a row sample


# ---- cells ---------------------------------------------------------------------------------------


def method_label(setting: Setting) -> str:
    return setting.method + (" (oracle)" if setting.role == "oracle" else "")


def budget_label(setting: Setting) -> str:
    return MISSING if setting.budget is None else str(setting.budget)


def status_text(setting: Setting) -> str:
    """ok, or what went wrong; then the floor marker and what else the method estimates."""
    text = setting.status if setting.status == "ok" else f"{setting.status}: {setting.reason}"
    ok = len(setting.ok_records)
    if setting.status == "ok" and ok < setting.seeds:
        text = f"{ok}/{setting.seeds} seeds ok: {setting.reason}"
    if setting.beats_mean_floor is False:
        text += " · not below mean floor"
    if setting.estimates != "softmax":
        text += f" · estimates {setting.estimates}"
    return text


# A narrow table shows the status as a code (one row per line); the legend under it says what
# each code present means and lists the reasons the codes stand for.
STATUS_LEGEND = {
    "ok": "ran",
    "≥floor": "ran, error not below the mean-of-V floor",
    "n/m": "n of m seeds ran",
    "est": "estimates another function",
    "unsup": "cannot run here",
    "oom": "out of memory",
    "error": "failed",
}


def status_code(setting: Setting) -> str:
    """``status_text`` in a few letters: ok, ≥floor, 2/3, unsup, oom, error (and est)."""
    if setting.status != "ok":
        return "unsup" if setting.status == "unsupported" else setting.status
    ok = len(setting.ok_records)
    code = "ok" if ok == setting.seeds else f"{ok}/{setting.seeds}"
    if setting.beats_mean_floor is False:
        code = "≥floor" if code == "ok" else f"{code} ≥floor"
    return code if setting.estimates == "softmax" else f"{code} est"


def status_legend(rows: Sequence[Setting]) -> list[str]:
    """Under a table drawn with status codes: the codes present, then each longer status."""
    used = {word for row in rows for word in status_code(row).split()}
    if any("/" in word for word in used):
        used.add("n/m")
    line = " · ".join(f"{c} {meaning}" for c, meaning in STATUS_LEGEND.items() if c in used)
    reasons = dict.fromkeys(
        f"  {method_label(s)} @ {budget_label(s)}: {status_text(s)}"
        for s in rows
        if status_code(s) not in ("ok", "≥floor")
    )
    return [f"status: {line}", *reasons]


def _missing(setting: Setting, metric: str) -> str:
    return NOT_AVAILABLE if setting.unavailable(metric) else MISSING


def _error_mean(metric: str) -> Callable[[Setting], str]:
    def cell(setting: Setting) -> str:
        stats = setting.errors.get(metric)
        if stats is None:
            return _missing(setting, metric)
        text = f"{stats.mean:.4f}"
        if len(setting.ok_records) > 1 and stats.std is not None:  # None: a seed not finite
            text += f" ± {stats.std:.4f}"
        if stats.low is not None and stats.high is not None:
            # a row sample's 95 % interval, under the estimate (a line of its own keeps the column
            # narrow; Markdown puts it beside)
            text += f"\n[{stats.low:.4f}, {stats.high:.4f}]"
        return (LOWER_BOUND if stats.lower_bound else "") + text

    return cell


def _error_max(metric: str) -> Callable[[Setting], str]:
    def cell(setting: Setting) -> str:
        stats = setting.errors.get(metric)
        if stats is None:
            return _missing(setting, metric)
        return (LOWER_BOUND if stats.lower_bound else "") + f"{stats.max:.4f}"

    return cell


def extrapolated(setting: Setting, which: str = "exact_s") -> bool:
    """Is exact attention's time (``exact_s``, or ``exact_backward_s``) scaled from a row sample?"""
    time = setting.time
    stat = None if time is None else getattr(time, which)
    return bool(stat is not None and stat.extrapolated)


def _mark(setting: Setting, text: str, which: str = "exact_s") -> str:
    return f"{EXTRAPOLATED} {text}" if extrapolated(setting, which) and text != MISSING else text


def _speedup(setting: Setting) -> str:
    time = setting.time
    if setting.role == "reference" or time is None or not time.speedup:
        return MISSING  # exact attention against itself is 1× by definition
    return _mark(setting, fmt_speedup(time.speedup))


def _exact_time(setting: Setting) -> str:
    return _mark(setting, fmt_time(setting.time and setting.time.exact_median))


def _backward_time(setting: Setting) -> str:
    return fmt_time(setting.time and setting.time.backward_median)


def _backward_speedup(setting: Setting) -> str:
    time = setting.time
    if time is None or not time.backward_speedup:
        return MISSING
    return _mark(setting, f"{time.backward_speedup:.1f}×", "exact_backward_s")


def _exact_backward_time(setting: Setting) -> str:
    text = fmt_time(setting.time and setting.time.exact_backward_median)
    return _mark(setting, text, "exact_backward_s")


def _timed_backward(setting: Setting) -> bool:
    """Was a forward + backward asked for in this setting's timing (timed, or why not)?"""
    time = setting.time
    return time is not None and (
        time.backward_s is not None
        or time.exact_backward_s is not None
        or time.backward_note is not None
    )


def _diagnostic(name: str) -> Callable[[Setting], str]:
    """A diagnostic's mean over seeds; the split in rel_spectral, or in rel_frobenius where a
    row sample cannot give it (the run's primary metric either way)."""

    def cell(setting: Setting) -> str:
        stats = setting.diagnostic(name) or setting.diagnostic(name, "rel_frobenius")
        if stats is None or stats.mean is None:
            return MISSING
        return f"{stats.mean:.4g}" if name == "lse_error" else f"{stats.mean:.4f}"

    return cell


def _fraction(value: float | None) -> str:
    return MISSING if value is None else f"{value:.3g}"


def _keys(value: float | None) -> str:
    return MISSING if value is None else f"{value:.4g}"


# ---- the columns ---------------------------------------------------------------------------------


def _columns() -> tuple[list[Column[Setting]], dict[str, str]]:
    """Every column, in display order, and the metric each metric column shows."""
    columns = [
        Column("layer", "layer", lambda s: MISSING if s.layer is None else str(s.layer), "left"),
        Column("phase", "phase", lambda s: s.phase, "left"),
        Column("method", "method", method_label, "left"),
        Column("budget", "budget", budget_label),
    ]
    needs = {}
    for metric in METRICS:
        short = "bound" if metric == "bound_normalized" else metric
        columns.append(Column(short, f"{metric}\nmean ± std", _error_mean(metric)))
        columns.append(Column(f"{short}_max", "max", _error_max(metric), flat=f"{metric} max"))
        needs[short] = needs[f"{short}_max"] = metric
    columns += [
        Column("time", "time", lambda s: fmt_time(s.time and s.time.method_median)),
        Column("exact_time", "exact", _exact_time),
        Column("speedup", "speed-up", _speedup),
        Column("backward", "fwd+bwd", _backward_time),
        Column("exact_backward", "exact\nfwd+bwd", _exact_backward_time, flat="exact fwd+bwd"),
        Column(
            "backward_speedup",
            "fwd+bwd\nspeed-up",
            _backward_speedup,
            flat="fwd+bwd speed-up",
        ),  # fmt: skip
        Column("flops", "FLOPs", lambda s: fmt_flops(s.flops)),
        Column(
            "flops_fraction",
            "FLOPs\n/exact",
            lambda s: _fraction(s.flops_fraction),
            flat="FLOPs / exact",
        ),  # fmt: skip
        Column("keys", "keys\n/query", lambda s: _keys(s.keys_per_query), flat="keys per query"),
        *(
            Column(key, header, _diagnostic(name), flat=flat)
            for key, name, header, flat in DIAGNOSTIC
        ),
        Column(
            "status",
            "status",
            status_text,
            "left",
            wraps=True,
            short=status_code,
            legend=status_legend,
        ),
    ]
    return columns, needs


COLUMNS, NEEDS = _columns()
COLUMN_KEYS = tuple(c.key for c in COLUMNS)
ALWAYS = ("layer", "phase", "method", "budget", "rel_spectral", "time", "speedup", "status")
# Joined while they fit, in this order: the spread of the primary metric first, the forward +
# backward time and its speed-up (present only when --backward timed them, which asks for them),
# the cost as a fraction of exact attention's, then the other metrics, then what the time is
# measured against and what a query pays.
OPTIONAL = (
    "rel_spectral_max", "backward_speedup", "backward", "flops_fraction", "rel_frobenius",
    "max_row_rel", "bound", "exact_time", "exact_backward", "keys", "rel_frobenius_max",
    "max_row_rel_max", "bound_max", "flops",
)  # fmt: skip
BACKWARD_COLUMNS = ("backward", "exact_backward", "backward_speedup")


def parse_columns(text: str | None) -> tuple[str, ...] | None:
    """``--columns a,b,c`` or ``all``; None means choose by width."""
    return table.parse_columns(text, COLUMN_KEYS)


def layout(rows: Sequence[Setting]) -> Layout[Setting]:
    """The columns these rows can fill, what is always shown, and the order the rest join in."""
    present = {m for row in rows for m in METRICS if m in row.errors or row.unavailable(m)}
    absent = {key for key, metric in NEEDS.items() if metric not in present}
    if all(row.layer is None for row in rows):  # not a run over a capture's layers
        absent.add("layer")
    if len({row.phase for row in rows}) < 2:  # one phase: the title says which
        absent.add("phase")
    if not any(_timed_backward(row) for row in rows):  # no --backward
        absent.update(BACKWARD_COLUMNS)
    if not any(row.diagnosed for row in rows):  # --no-diagnostics, or a document before them
        absent.update(DIAGNOSTIC_COLUMNS)
    required, optional = ALWAYS, OPTIONAL
    if primary_metric(r for row in rows for r in row.records) != PRIMARY:
        # a row sample: its rel_frobenius estimate leads; rel_spectral (n/a) joins if it fits
        required = tuple("rel_frobenius" if key == PRIMARY else key for key in ALWAYS)
        rest = [key for key in OPTIONAL if key not in ("rel_frobenius", "rel_spectral_max")]
        optional = (PRIMARY, *rest, "rel_spectral_max")
    columns = tuple(column for column in COLUMNS if column.key not in absent)
    return Layout(columns, required, optional, STATUS_ROOM)


def choose_columns(
    rows: Sequence[Setting], width: int, asked: Sequence[str] | None = None
) -> tuple[list[Column[Setting]], list[str]]:
    """The columns to draw at ``width`` and the names of those left out for lack of room."""
    choice = table.choose(layout(rows), rows, width, asked)
    return choice.columns, choice.left_out
