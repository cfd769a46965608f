"""``kdecli plot DRIFT.json`` (a ``kdecli drift`` document): a model's drift against budget or layer.

``--x budget`` (the default): one figure of the model's output against the budget, one line per
method (the mean over seeds, a band spanning the seeds' min–max), and the ``mean`` baseline in the
same layers as a dashed line: the floor a method must beat.  The figure is KL(p‖p̂) for a
next-token model and the embedding cosine for an encoder by default; ``--y`` picks top1,
perplexity, hidden_max or hidden_last instead.  A method without a budget (``exact``) is a
dash-dotted horizontal line.

``--x layer``: the hidden-state drift ‖Ĥ⁽ˡ⁾−H⁽ˡ⁾‖_F/‖H⁽ˡ⁾‖_F at every layer, one line per
method × budget, the floor's per layer dashed, the patched layers shaded: drift starts at the first
patched layer and shows how it grows or heals through the rest.

A ``--generate`` document draws its generation figures: against the budget (``--y`` kl, top1,
perplexity — teacher-forced on the exact generation — first_divergence or token_agreement), or,
``--x step``, the per-step KL (or ``--y top1``) along the generation, one line per method ×
budget, the floor's dashed: whether the error accumulates as the generation goes on.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdecli.errors import UsageError
from kdecli.experiments.drift.records import DriftReport, DriftResult
from kdecli.render.figures import (
    BAND_ALPHA,
    FLOOR,
    caption,
    check_plot_path,
    log_if_spread,
    method_colours,
    new_figure,
    save_figure,
    shared_legend,
)

X_AXES = ("budget", "layer", "step")
# --y name -> (the DriftResult field, the axis label, is higher better)
FIGURES = {
    "kl": ("kl", "KL(p‖p̂) of the next-token distribution", False),
    "top1": ("top1", "top-1 agreement with the exact model", True),
    "perplexity": ("perplexity", "perplexity", False),
    "cosine": ("cosine", "cosine of the embedding with the exact one", True),
    "hidden_max": ("hidden_max", "hidden drift, largest over layers", False),
    "hidden_last": ("hidden_last", "hidden drift, last layer", False),
    "first_divergence": ("first_divergence", "first step where the generation differs", True),
    "token_agreement": ("token_agreement", "token agreement with the exact generation", True),
}
# --y name -> the GenerationFigures field a --generate document draws for it
GENERATION = {
    "kl": "kl",
    "top1": "top1_agreement",
    "perplexity": "perplexity",
    "first_divergence": "first_divergence",
    "token_agreement": "token_agreement",
}
STEP_CURVES = {"kl": "kl_per_step", "top1": "top1_agreement_per_step"}
HIDDEN = "hidden drift ‖Ĥ−H‖_F / ‖H‖_F"


def default_y(report: DriftReport) -> str:
    """KL for a next-token model, cosine for an embedding model."""
    return "kl" if report.model.output == "next-token" else "cosine"


def _values(r: DriftResult, name: str) -> tuple[float | None, list[float]]:
    """(the seed mean, every seed's value) of one figure of a result."""
    field = FIGURES[name][0]
    if r.generation is not None:
        stat = getattr(r.generation, GENERATION[name]) if name in GENERATION else None
        if stat is None or stat.mean is None:
            return None, []
        return stat.mean, [v for v in stat.per_seed if v is not None]
    if field in ("hidden_max", "hidden_last"):
        value = getattr(r, field)
        return value, [] if value is None else [value]
    stat = getattr(r, field)
    if stat is None or stat.mean is None:
        return None, []
    return stat.mean, [v for v in stat.per_seed if v is not None]


def figure(report: DriftReport, x: str = "budget", y: str | None = None):
    """A matplotlib Figure of ``report`` (module docstring).  Artists carry a gid: ``"method"``,
    ``"band"``, ``"floor"``."""
    if x not in X_AXES:
        raise UsageError(f"--x must be budget, layer or step for a drift document; got {x!r}.")
    if x == "step":
        return _step_figure(report, "kl" if y is None else y)
    if x == "layer":
        if y not in (None, "hidden"):
            raise UsageError(f"--x layer draws the hidden drift of every layer; drop --y {y}.")
        return _layer_figure(report)
    y = default_y(report) if y is None else y
    if y not in FIGURES:
        raise UsageError(
            f"--y must be one of {', '.join(FIGURES)} for a drift document; got {y!r}."
        )
    ok = [r for r in report.results if r.ok and _values(r, y)[0] is not None]
    if not ok:
        own = default_y(report)
        hint = (
            None if y == own else f"This {report.model.output} model's figure is {own}: --y {own}."
        )
        raise UsageError(f"nothing to plot: no result with status ok has {y}.", hint=hint)
    fig = new_figure(9.0, 5.2)
    ax = fig.subplots()
    colours = method_colours(r.method for r in ok)
    values: list[float] = []
    zeros: list[str] = []  # at 0, as exact is: below any log axis
    for method, colour in colours.items():
        mine = sorted((r for r in ok if r.method == method), key=lambda r: r.budget or 0)
        if all(r.budget is None for r in mine):
            value = _values(mine[0], y)[0]
            values.append(value)
            zeros += [method] if value <= 0 else []
            ax.axhline(value, color=colour, linestyle="-.", gid="method",
                       label=f"{method} (no budget) {value:.3g}")  # fmt: skip
            continue
        mine = [r for r in mine if r.budget is not None]
        points = [(r.budget, *_values(r, y)) for r in mine]
        ax.plot([b for b, _, _ in points], [m for _, m, _ in points], "o-", color=colour,
                label=method, gid="method")  # fmt: skip
        values += [m for _, m, _ in points]
        if any(len(seeds) > 1 for _, _, seeds in points):
            low = [min(seeds, default=m) for _, m, seeds in points]
            high = [max(seeds, default=m) for _, m, seeds in points]
            ax.fill_between([b for b, _, _ in points], low, high, color=colour, alpha=BAND_ALPHA,
                            linewidth=0, gid="band")  # fmt: skip
    floor = None if report.floor is None else _values(report.floor, y)[0]
    if floor is not None:
        values.append(floor)
        ax.axhline(floor, label=f"mean floor {floor:.3g}", **FLOOR)
    logarithmic = log_if_spread(ax, values)
    budgets = sorted({r.budget for r in ok if r.budget is not None})
    if budgets:
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets], minor=False)
        ax.minorticks_off()
    ax.set_xlabel("budget (keys or features per query)")
    ax.set_ylabel(FIGURES[y][1] + "\nmean over seeds")
    ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(_title(report), fontsize="medium", x=0.01, ha="left")
    shared_legend(fig, [ax])
    better = "higher" if FIGURES[y][2] else "lower"
    text = (
        f"Points: the mean over seeds ({better} is better); bands: the seeds' min–max. The dashed "
        "line is the `mean` baseline in the same layers: a method on the wrong side of it does "
        "worse than averaging V."
    )
    caption(fig, text + _zero_note(zeros if logarithmic else [], y))
    return fig


def _zero_note(names: list[str], what: str) -> str:
    """Say which methods sit at 0 (exact attention does), out of a logarithmic axis's reach."""
    if not names:
        return ""
    return f" {', '.join(names)}: {what} 0, below the logarithmic axis (not drawn)."


def _layer_figure(report: DriftReport):
    settings = [r for r in report.results if r.ok and r.hidden]
    if not settings:
        raise UsageError("nothing to plot: no result with status ok has a hidden drift.")
    fig = new_figure(9.0, 5.2)
    ax = fig.subplots()
    colours = method_colours(r.method for r in settings)
    budgets = list(dict.fromkeys(r.budget for r in settings))
    values: list[float] = []
    zeros: list[str] = []
    for r in settings:
        layers, means = _hidden(r)
        values += means
        style = ("-", "--", ":", "-.")[budgets.index(r.budget) % 4]
        name = r.method + ("" if r.budget is None else f" @ {r.budget}")
        zeros += [name] if means and max(means) <= 0 else []
        ax.plot(layers, means, linestyle=style, marker="o", color=colours[r.method], label=name,
                gid="method")  # fmt: skip
    if report.floor is not None and report.floor.hidden:
        layers, means = _hidden(report.floor)
        values += means
        ax.plot(layers, means, label="mean floor", **FLOOR)
    for layer in report.layers:
        ax.axvspan(layer - 0.4, layer + 0.4, color="0.9", zorder=0, gid="patched")
    logarithmic = log_if_spread(ax, values)
    ax.set_xticks(range(report.model.n_layers))
    ax.set_xlabel("layer of the model (shaded: patched)")
    ax.set_ylabel(HIDDEN + "\nmean over seeds")
    ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(_title(report), fontsize="medium", x=0.01, ha="left")
    shared_legend(fig, [ax])
    text = (
        "Points: the mean over seeds of each layer's drift over all tokens (the last layer is the "
        "model's output); the dashed line: the `mean` baseline in the same layers."
    )
    caption(fig, text + _zero_note(zeros if logarithmic else [], "drift"))
    return fig


def _step_figure(report: DriftReport, y: str):
    """The per-step curves of a ``--generate`` document (module docstring)."""
    if report.generate is None:
        raise UsageError(
            "--x step draws the per-step curves of a `drift --generate` document; this one has "
            "none (it was run without --generate)."
        )
    if y not in STEP_CURVES:
        raise UsageError(f"--x step draws kl or top1 per step; got --y {y}.")
    settings = [r for r in report.results if r.ok and r.generation is not None]
    if not settings:
        raise UsageError("nothing to plot: no result with status ok has a generation.")
    fig = new_figure(9.0, 5.2)
    ax = fig.subplots()
    colours = method_colours(r.method for r in settings)
    budgets = list(dict.fromkeys(r.budget for r in settings))
    values: list[float] = []
    for r in settings:
        curve = getattr(r.generation, STEP_CURVES[y])
        steps = [t for t, v in enumerate(curve) if v is not None]
        points = [v for v in curve if v is not None]
        values += points
        style = ("-", "--", ":", "-.")[budgets.index(r.budget) % 4]
        name = r.method + ("" if r.budget is None else f" @ {r.budget}")
        ax.plot(steps, points, linestyle=style, color=colours[r.method], label=name, gid="method")
    floor = report.floor and report.floor.generation
    if floor is not None:
        curve = getattr(floor, STEP_CURVES[y])
        steps = [t for t, v in enumerate(curve) if v is not None]
        values += [v for v in curve if v is not None]
        ax.plot(steps, [v for v in curve if v is not None], label="mean floor", **FLOOR)
    if y == "kl":
        log_if_spread(ax, [v for v in values if v > 0])
    ax.set_xlabel(f"generation step (0: the first token after the prompt; {report.phase} phase)")
    ax.set_ylabel(FIGURES[y][1] + "\nteacher-forced, mean over prompts and seeds")
    ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(_title(report), fontsize="medium", x=0.01, ha="left")
    shared_legend(fig, [ax])
    caption(
        fig,
        "Each step's figure with the exact generation fed through the KV cache (teacher forcing); "
        "the dashed line: the `mean` baseline in the same layers and phases.",
    )
    return fig


def _hidden(r: DriftResult) -> tuple[list[int], list[float]]:
    pairs = [(i, s.mean) for i, s in enumerate(r.hidden) if s.mean is not None]
    return [i for i, _ in pairs], [m for _, m in pairs]


def _title(report: DriftReport) -> str:
    m = report.model
    layers = ",".join(map(str, report.layers)) if report.layers else "none"
    return (
        f"drift of {m.source} ({m.model_type}, {m.n_layers} layers) · layers {layers} · "
        f"{report.chunks} × {report.tokens} tokens of {report.text} · "
        + ("" if report.generate is None else f"{report.generate} generated · ")
        + report.environment.label()
    )


def plot_drift(
    report: DriftReport, path: str | os.PathLike, x: str = "budget", y: str | None = None
) -> Path:
    """Draw ``report`` to ``path`` (.png, .svg or .pdf) and return the path."""
    check_plot_path(path)
    return save_figure(figure(report, x, y), path)
