"""Render a ``RunReport``: a rich table for people, JSON / JSONL / CSV for other tools.

Non-finite numbers never reach JSON: they become ``null`` (the record's status says why).
The table aggregates seeds (mean ± std of each record's slice-mean); JSON keeps every seed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from kdecli.metrics import METRICS
from kdecli.runner import RunReport

FORMATS = ("table", "json", "jsonl", "csv")


def clean(value: Any) -> Any:
    """Replace NaN/inf by None, recursively, so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def to_json(report: RunReport) -> str:
    return json.dumps(clean(report.as_dict()), indent=2, allow_nan=False)


def jsonl_header(report: RunReport) -> str:
    """First JSONL line: the run (schema, environment, input, floors); then one line per result."""
    head = report.as_dict()
    head.pop("results")
    head.pop("pareto", None)  # known only at the end: its own last line (jsonl_pareto)
    return json.dumps(clean({"type": "run", **head}), allow_nan=False)


def jsonl_result(record: dict[str, Any]) -> str:
    return json.dumps(clean({"type": "result", **record}), allow_nan=False)


def jsonl_pareto(pareto: dict[str, Any]) -> str:
    """Last JSONL line of a run with ``--target-error``: ``{"type": "pareto", ...}``."""
    return json.dumps(clean({"type": "pareto", **pareto}), allow_nan=False)


CSV_FIELDS = [
    "method", "budget", "seed", "status", "reason", "params", "oracle",
    *(f"{m}_{s}" for m in METRICS for s in ("mean", "max")),
    "method_s_median", "method_s_iqr", "exact_s_median", "speedup", "flops", "beats_mean_floor",
    "scale", "dtype", "device",
]


def to_csv(report: RunReport) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in report.results:
        row = {key: r.get(key) for key in ("method", "budget", "seed", "status", "reason", "oracle",
                                             "flops", "beats_mean_floor")}
        row["params"] = json.dumps(r["params"], sort_keys=True)
        for m in METRICS:
            for s in ("mean", "max"):
                row[f"{m}_{s}"] = clean(r["errors"].get(m, {}).get(s))
        t = r.get("time") or {}
        row["method_s_median"] = (t.get("method_s") or {}).get("median")
        row["method_s_iqr"] = (t.get("method_s") or {}).get("iqr")
        row["exact_s_median"] = (t.get("exact_s") or {}).get("median")
        row["speedup"] = t.get("speedup")
        row.update(scale=report.input["scale"], dtype=report.environment["dtype"],
                   device=report.environment["device"])
        writer.writerow(row)
    return buffer.getvalue()


# ---- the table ---------------------------------------------------------------------------------

def aggregate(results: list[dict[str, Any]], mean_floor: float = math.inf) -> list[dict[str, Any]]:
    """One row per method × budget: mean, std and max over seeds of each metric.

    ``beats_mean_floor`` compares the seed-averaged rel_spectral with the mean baseline's.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["method"], r["budget"], json.dumps(r["params"], sort_keys=True))].append(r)
    rows = []
    for (method, budget, _), records in groups.items():
        ok = [r for r in records if r["status"] == "ok"]
        row = {"method": method, "budget": budget, "params": records[0]["params"],
               "oracle": records[0].get("oracle", False), "seeds": len(records), "ok": len(ok),
               "status": "ok" if len(ok) == len(records) else _worst_status(records),
               "reason": next((r["reason"] for r in records if r["reason"]), None),
               "estimates": records[0].get("estimates", "softmax"), "errors": {}, "time": None,
               "beats_mean_floor": None,
               "flops": next((r["flops"] for r in ok if r.get("flops") is not None), None)}
        for metric in METRICS:
            means = [r["errors"][metric]["mean"] for r in ok if metric in r["errors"]]
            if means:
                row["errors"][metric] = {
                    "mean": statistics.fmean(means),
                    "std": statistics.stdev(means) if len(means) > 1 else 0.0,
                    "max": max(r["errors"][metric]["max"] for r in ok),
                }
        timed = [r["time"] for r in ok if r.get("time") and r["time"].get("method_s")]
        if timed:
            row["time"] = timed[0]
        if method != "mean" and "rel_spectral" in row["errors"]:
            row["beats_mean_floor"] = row["errors"]["rel_spectral"]["mean"] < mean_floor
        rows.append(row)
    return rows


def _worst_status(records) -> str:
    order = ["error", "oom", "unsupported", "ok"]
    return min((r["status"] for r in records), key=order.index)


def _fmt_err(entry: dict[str, float] | None, seeds: int) -> list[str]:
    """[mean ± std over seeds, max over slices and seeds]."""
    if not entry:
        return ["—", "—"]
    text = f"{entry['mean']:.4f}"
    if seeds > 1:
        text += f" ± {entry['std']:.4f}"
    return [text, f"{entry['max']:.4f}"]


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def _fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items()) or "—"


def render_table(report: RunReport, console: Console) -> None:
    rows = aggregate(report.results, report.floors["mean"]["rel_spectral"]["mean"])
    show_bound = any("bound_normalized" in r["errors"] for r in rows)
    inp, env = report.input, report.environment
    shape = inp["shape"]
    title = (
        f"{inp['source']}  b={shape['b']} h={shape['h']} n_q={shape['n_q']} n_k={shape['n_k']} "
        f"d={shape['d']} d_v={shape['d_v']}  scale={inp['scale']:.6g}"
        + ("  causal" if inp["causal"] else "")
    )
    table = Table(title=title, title_justify="left")
    table.add_column("method")
    table.add_column("budget", justify="right")
    for metric in METRICS[:3] + (("bound_normalized",) if show_bound else ()):
        table.add_column(f"{metric}\nmean ± std", justify="right")
        table.add_column("max", justify="right")
    for column in ("time", "exact", "speed-up"):
        table.add_column(column, justify="right")
    table.add_column("status", overflow="fold", min_width=12)
    params_lines = []
    for row in rows:
        name = row["method"] + (" (oracle)" if row["oracle"] else "")
        budget = "—" if row["budget"] is None else str(row["budget"])
        t = row["time"] or {}
        status = row["status"] if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
        if row["status"] == "ok" and row["ok"] < row["seeds"]:
            status = f"{row['ok']}/{row['seeds']} seeds ok: {row['reason']}"
        if row["beats_mean_floor"] is False:
            status += " · not below mean floor"
        if row["estimates"] != "softmax":
            status += f" · estimates {row['estimates']}"
        style = None if row["status"] == "ok" else "red"
        if row["beats_mean_floor"] is False:
            style = "yellow"
        cells = [name, budget]
        for metric in METRICS[:3] + (("bound_normalized",) if show_bound else ()):
            cells += _fmt_err(row["errors"].get(metric), row["ok"])
        speedup = t.get("speedup")
        cells += [_fmt_time((t.get("method_s") or {}).get("median")),
                  _fmt_time((t.get("exact_s") or {}).get("median")),
                  f"{speedup:.1f}×" if speedup else "—", status]
        table.add_row(*cells, style=style)
        if row["params"]:
            params_lines.append(f"  {name} @ {budget}: {_fmt_params(row['params'])}")
    console.print(table)
    if params_lines:
        console.print("resolved parameters:\n" + "\n".join(params_lines), highlight=False)
    if report.pareto is not None:
        render_pareto(report.pareto, rows, console)
    mean_floor, zero = report.floors["mean"], report.floors["zero"]
    floor_text = (
        f"floors: mean-of-V baseline rel_spectral {mean_floor['rel_spectral']['mean']:.4g} "
        f"(rel_frobenius {mean_floor['rel_frobenius']['mean']:.4g}, max_row_rel "
        f"{mean_floor['max_row_rel']['mean']:.4g}); zero output 1 on every relative norm"
    )
    if "bound_normalized" in zero:
        floor_text += f" (bound_normalized {zero['bound_normalized']['mean']:.4g})"
    console.print(floor_text + ".")
    console.print(
        f"device {env['device']} ({env['device_name']}), dtype {env['dtype']}, {env['threads']} "
        f"threads, torch {env['torch']}; errors are means over {shape['b'] * shape['h']} "
        "batch×head slices (± std over seeds; max over slices and seeds); time is the median."
    )


def _fmt_flops(flops: float | None) -> str:
    if flops is None:
        return "—"
    for factor, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if flops >= factor:
            return f"{flops / factor:.3g} {unit}"
    return f"{flops:.3g}"


def render_pareto(pareto: dict[str, Any], rows: list[dict[str, Any]], console: Console) -> None:
    """The small table under the main one: each method's cheapest setting that reaches the target."""
    metric, target = pareto["metric"], pareto["target_error"]
    table = Table(
        title=f"cheapest setting with seed-mean {metric} ≤ {target:g} (fewest FLOPs, then time)",
        title_justify="left",
    )
    for column, justify in (("method", "left"), ("budget", "right"), ("FLOPs", "right"),
                            (metric, "right"), ("time", "right"), ("parameters", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for name, pick in pareto["methods"].items():
        if pick is None:
            reached = [r["errors"][metric]["mean"] for r in rows
                       if r["method"] == name and r["status"] == "ok" and metric in r["errors"]]
            best = f"not reached (best {min(reached):.4f})" if reached else "not reached (no ok result)"
            table.add_row(name, "—", "—", best, "—", "—", style="yellow")
            continue
        budget = "—" if pick["budget"] is None else str(pick["budget"])
        table.add_row(name, budget, _fmt_flops(pick["flops"]), f"{pick[metric]:.4g}",
                      _fmt_time(pick["method_s"]), _fmt_params(pick["params"]))
    console.print(table)


def render(report: RunReport, fmt: str, stream: TextIO, *, width: int | None = None) -> None:
    """Write ``report`` to ``stream`` in one of FORMATS."""
    if fmt == "json":
        stream.write(to_json(report) + "\n")
    elif fmt == "jsonl":
        stream.write(jsonl_header(report) + "\n")
        for record in report.results:
            stream.write(jsonl_result(record) + "\n")
        if report.pareto is not None:
            stream.write(jsonl_pareto(report.pareto) + "\n")
    elif fmt == "csv":
        stream.write(to_csv(report))
    elif fmt == "table":
        if width is None and not stream.isatty():
            width = 200  # a file or a pipe: do not squeeze the table into 80 columns
        console = Console(file=stream, width=width, soft_wrap=False)
        render_table(report, console)
    else:
        raise ValueError(fmt)

