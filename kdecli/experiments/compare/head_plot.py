"""``plot --x head``: the error of each head, where a mean over heads hides the one that breaks.

- A document of one layer (or none): one line per method × budget (a colour per method, a line
  style per budget), x the head index, y the head's figure (``kdecli.experiments.compare.heads``:
  the mean over seeds of its slice, and over the batch where b > 1), with each head's mean-of-V
  floor as a dashed line.
- A document over a capture's layers (``compare --all-layers``): a layer × head heat map per
  method × budget, on one colour scale (logarithmic where the figures span more than a decade),
  so a head that breaks in one layer stands out.

Several documents are drawn together as lines (a marker per file); a heat map draws one document.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence

from kdecli.errors import UsageError
from kdecli.experiments.compare.heads import HeadProfile, worst_heads
from kdecli.experiments.compare.records import RunReport
from kdecli.render.figures import FLOOR, caption, log_if_spread, new_figure

HEAD_AXIS = "head (mean over the batch and seeds)"
MARKERS = ("o", "s", "^", "D")


def by_head(profile: HeadProfile) -> dict[int | None, dict[int, float]]:
    """{layer: {head: figure}}: each head's figure, the mean over the batch (inf if any is)."""
    values: dict[int | None, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for head in profile.heads:
        values[head.layer][head.head].append(head.value)
    return {
        layer: {
            h: statistics.fmean(v) if all(map(math.isfinite, v)) else math.inf
            for h, v in sorted(heads.items())
        }
        for layer, heads in values.items()
    }


def _name(profile: HeadProfile) -> str:
    return profile.label + ("" if profile.budget is None else f" @ {profile.budget}")


def _floor_by_head(doc: RunReport, y: str) -> list[float] | None:
    """The mean-of-V floor of each head (mean over the batch), from the floors' slices."""
    summary = doc.floors.mean.get(y)
    if summary is None or not summary.per_slice or None in summary.per_slice:
        return None
    heads = doc.input.shape.h
    return [statistics.fmean(summary.per_slice[h::heads]) for h in range(heads)]


def head_figure(docs: Sequence[RunReport], y: str, labels: Sequence[str]):
    """The figure of ``plot --x head`` (module docstring); artists carry a gid: ``"method"`` for
    the heads' lines, ``"floor"`` for the floors, ``"heatmap"`` for a heat map's image."""
    profiles_of = [worst_heads(doc, y) for doc in docs]
    if any(len({h.layer for p in profiles for h in p.heads}) > 1 for profiles in profiles_of):
        if len(docs) > 1:
            raise UsageError(
                "--x head draws a layer × head heat map of one run over layers; got "
                f"{len(docs)} documents.",
                hint="Draw each document to its own image.",
            )
        return _heat_map(docs[0], profiles_of[0], y)
    fig = new_figure(9.0, 5.2)
    ax = fig.subplots()
    several = len(docs) > 1
    values: list[float] = []
    for doc, profiles, label, marker in zip(docs, profiles_of, labels, MARKERS * len(docs)):
        where = f" · {label}" if several else ""
        methods = list(dict.fromkeys(p.method for p in profiles))
        budgets = list(dict.fromkeys(p.budget for p in profiles))
        for profile in profiles:
            ((_, heads),) = by_head(profile).items()
            finite = {h: v for h, v in heads.items() if math.isfinite(v)}
            if not finite:
                continue
            values += finite.values()
            colour = f"C{methods.index(profile.method) % 10}"
            style = ("-", "--", ":", "-.")[budgets.index(profile.budget) % 4]
            phase = f" · {profile.phase}" if len(doc.phases) > 1 else ""
            ax.plot(list(finite), list(finite.values()), linestyle=style, marker=marker,
                    color=colour, label=_name(profile) + phase + where, gid="method")  # fmt: skip
        floor = _floor_by_head(doc, y)
        if floor is not None and len(doc.phases) == 1:
            ax.plot(range(len(floor)), floor, label=f"mean-of-V floor{where}", **FLOOR)
    if not values:
        raise UsageError(f"nothing to plot: no result with status ok keeps {y} per head.")
    log_if_spread(ax, values)
    heads = max(d.input.shape.h for d in docs)
    ax.set_xticks(range(heads))
    ax.set_xlabel(HEAD_AXIS)
    ax.set_ylabel(f"{y} per head")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    fig.suptitle(_title(docs[0], y), fontsize="medium", x=0.01, ha="left")
    caption(
        fig,
        f"Each point: one head's {y}, the mean over seeds (and over the batch where b > 1) of "
        "its slice; the table's figure is the mean of these. Dashed grey: each head's "
        "mean-of-V floor.",
        110,
    )
    return fig


def _title(doc: RunReport, y: str) -> str:
    source = doc.input.source.rsplit(":/", 1)[0]  # a capture, not its first layer
    s = doc.input.shape
    return f"{y} per head · {source}\nb={s.b} h={s.h} n_q={s.n_q} n_k={s.n_k} d={s.d}"


def _heat_map(doc: RunReport, profiles: Sequence[HeadProfile], y: str):
    """One panel per method × budget: layers up, heads across, one shared colour scale."""
    from matplotlib.colors import LogNorm, Normalize

    grids = []
    for profile in profiles:
        layers = by_head(profile)
        rows = sorted(layer for layer in layers if layer is not None)
        heads = sorted({h for per_layer in layers.values() for h in per_layer})
        grid = [[layers[layer].get(h, math.nan) for h in heads] for layer in rows]
        grids.append((profile, rows, heads, grid))
    values = [v for *_, grid in grids for row in grid for v in row if math.isfinite(v)]
    if not values:
        raise UsageError(f"nothing to plot: no result with status ok keeps {y} per head.")
    positive = [v for v in values if v > 0]
    spread = positive and max(positive) > 10 * min(positive)
    norm = LogNorm(min(positive), max(positive)) if spread else Normalize(min(values), max(values))
    columns = min(3, len(grids))
    panels = math.ceil(len(grids) / columns)
    fig = new_figure(4.2 * columns + 1.6, 3.4 * panels + 1.2)
    axes = fig.subplots(panels, columns, squeeze=False).flatten()
    image = None
    for ax, (profile, rows, heads, grid) in zip(axes, grids):
        masked = [[v if math.isfinite(v) else math.nan for v in row] for row in grid]
        image = ax.imshow(masked, norm=norm, cmap="viridis", aspect="auto", origin="lower",
                          extent=(-0.5, len(heads) - 0.5, -0.5, len(rows) - 0.5))  # fmt: skip
        image.set_gid("heatmap")
        ax.set_title(_name(profile), fontsize="small")
        ax.set_xticks(range(len(heads)), [str(h) for h in heads], fontsize="x-small")
        ax.set_yticks(range(len(rows)), [str(layer) for layer in rows], fontsize="x-small")
        ax.set_xlabel("head", fontsize="small")
        ax.set_ylabel("layer", fontsize="small")
    for ax in axes[len(grids) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[: len(grids)]), label=f"{y} per head")
    fig.suptitle(_title(doc, y).replace("per head", "per layer × head"), fontsize="medium",
                 x=0.01, ha="left")  # fmt: skip
    caption(
        fig,
        f"Each cell: one head's {y} in one layer, the mean over seeds (and over the batch where "
        "b > 1); one colour scale for every panel.",
        110,
    )
    return fig
