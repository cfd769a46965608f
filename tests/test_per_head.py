"""Per head: the worst heads beside the mean (`--per-head`), the cheapest setting every head meets
(`--target-error E --every-head`), and the error per head (`plot --x head`, a layer × head heat map
for runs over layers)."""

import io
import json
import math
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kdecli
from kdecli.cli import app
from kdecli.experiments.compare.aggregate import aggregate
from kdecli.experiments.compare.heads import (
    cheapest_every_head,
    slice_position,
    worst_heads,
    worst_heads_table,
)
from kdecli.experiments.compare.pareto import cheapest_settings
from kdecli.experiments.compare.records import LayerInfo, Result, RunReport, load_document
from kdecli.experiments.compare.report import render, to_json
from kdecli.measure.figures import Diagnostics, Environment, Floors, InputInfo, Shape, Summary
from kdecli.render.table import console_for

runner = CliRunner()
NARROW = {"COLUMNS": "80"}
FIXTURES = Path(__file__).parent / "fixtures" / "documents_0_7"
ENV = Environment("2", "cpu", "", "float32", 1, "3.12")
HEADS = 4  # b=1: slice s is head s


def record(method, budget, seed, slices, *, layer=None, flops=None, density=None):
    """A result with known per-slice rel_spectral (and density), as a document keeps it."""
    errors = {"rel_spectral": Summary.of(slices), "rel_frobenius": Summary.of(slices)}
    diagnostics = None if density is None else Diagnostics(density=Summary.of(density))
    return Result(
        method, budget, seed, {}, "approximation", "softmax", "ok", None, errors, None, flops,
        None, ENV, layer, diagnostics=diagnostics,
    )  # fmt: skip


def document(results, layers=(None,), b=1):
    shape = Shape(b, HEADS, 16, 16, 8, 8)
    floor = Summary.of([1.0 + 0.1 * s for s in range(b * HEADS)])
    floors = Floors({"rel_spectral": floor}, {"rel_spectral": Summary.of([1.0] * (b * HEADS))})
    info = InputInfo("hand-made", shape, "bhnd", "float32", 0.35, False)
    parts = [LayerInfo(layer, info, floors) for layer in layers if layer is not None]
    return RunReport(ENV, info, floors, list(results), layers=parts)


def saved(tmp_path, report, name="doc.json"):
    path = tmp_path / name
    path.write_text(to_json(report))
    return path


def invoke(*args, env=NARROW):
    return runner.invoke(app, [str(a) for a in args], env=env)


# ---- the figures ------------------------------------------------------------------------------


def test_a_slice_is_a_batch_and_a_head():
    shape = Shape(2, 3, 8, 8, 4, 4)
    assert [slice_position(shape, s) for s in range(6)] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def measured():
    """A real run: two seeds, b=2 × h=3 slices, diagnostics where the method has key sets."""
    qkv = kdecli.load_input("synthetic:n=64,d=16,b=2,h=3,kind=clustered")
    return kdecli.compare(
        qkv, ["exact", "topk", "uniform"], [8, 24], seeds=2, device="cpu", repeats=1, warmup=0,
        timing=False,
    )  # fmt: skip


def test_per_head_means_equal_the_pooled_figures(measured):
    checked = 0
    for r in measured.results:
        for summary in r.errors.values():
            assert statistics.fmean(summary.per_slice) == pytest.approx(summary.mean, rel=1e-12)
            checked += 1
        for name in ("density", "mass_recall", "lse_error"):
            figure = r.diagnostics and r.diagnostics.figure(name)
            if figure is not None and figure.mean is not None:
                assert statistics.fmean(figure.per_slice) == pytest.approx(figure.mean, rel=1e-9)
    assert checked
    settings = {(s.method, s.budget): s for s in aggregate(measured.results)}
    profiles = worst_heads(measured)
    assert {(p.method, p.budget) for p in profiles} == {
        (m, b) for m in ("topk", "uniform") for b in (8, 24)
    }
    for p in profiles:
        assert len(p.heads) == 6
        assert p.mean == pytest.approx(settings[p.method, p.budget].error("rel_spectral"))
        assert p.max <= settings[p.method, p.budget].errors["rel_spectral"].max + 1e-12


def test_the_worst_heads_are_the_largest_seed_means_with_their_diagnostics():
    # layer 0: head 2 is bad in both seeds; layer 1: head 3 is worst on average, head 0 on one seed
    results = [
        record("m", 8, 0, [0.1, 0.2, 0.9, 0.1], layer=0, density=[0.1, 0.2, 0.3, 0.4]),
        record("m", 8, 1, [0.1, 0.2, 0.7, 0.1], layer=0, density=[0.1, 0.2, 0.5, 0.4]),
        record("m", 8, 0, [0.95, 0.1, 0.1, 0.6], layer=1, density=[0.1] * 4),
        record("m", 8, 1, [0.05, 0.1, 0.1, 0.6], layer=1, density=[0.1] * 4),
    ]
    report = document(results, layers=(0, 1))
    (profile,) = worst_heads(report)
    worst = profile.worst(3)
    assert [(h.layer, h.batch, h.head) for h in worst] == [(0, 0, 2), (1, 0, 3), (1, 0, 0)]
    assert [h.value for h in worst] == pytest.approx([0.8, 0.6, 0.5])
    assert worst[0].diagnostics == {"density": pytest.approx(0.4)}
    assert [h.floor for h in worst] == pytest.approx([1.2, 1.3, 1.0])  # each head's own floor
    assert [h.label for h in worst] == ["L0 b0 h2", "L1 b0 h3", "L1 b0 h0"]
    values = [v for r in results for v in r.errors["rel_spectral"].per_slice]
    assert profile.mean == pytest.approx(statistics.fmean(values))

    buffer = io.StringIO()
    worst_heads_table(report, console_for(buffer, 80, False))
    lines = buffer.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    body = [line for line in lines if "L0 " in line or "L1 " in line]
    assert [line.split("│")[4].strip() for line in body] == ["L0 b0 h2", "L1 b0 h3", "L1 b0 h0"]
    assert "0.8" in body[0] and "0.4" in body[0]  # the head's figure and its density


def test_a_batch_of_two_names_each_slice_by_batch_and_head():
    slices = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.05]  # b=2 × h=4
    (profile,) = worst_heads(document([record("m", 8, 0, slices)], b=2))
    assert [h.label for h in profile.worst(2)] == ["b1 h2", "b1 h1"]


def test_a_non_finite_head_is_the_worst():
    (profile,) = worst_heads(document([record("m", 8, 0, [0.1, math.inf, 0.2, 0.3])]))
    assert profile.worst(1)[0].head == 1 and math.isinf(profile.mean)
    # written and read back: the null slice is still the worst
    written = to_json(document([record("m", 8, 0, [0.1, math.inf, 0.2, 0.3])]))
    back = RunReport.from_dict(json.loads(written))
    assert worst_heads(back)[0].worst(1)[0].head == 1


# ---- the cheapest setting every head meets ------------------------------------------------------


def one_bad_head():
    """Budget 8 is cheap and good on average but one head fails 0.1; budget 16 meets it on all."""
    return [
        record("m", 8, 0, [0.02, 0.02, 0.3, 0.02], flops=1.0),
        record("m", 16, 0, [0.08, 0.07, 0.09, 0.06], flops=2.0),
        record("n", 8, 0, [0.5, 0.5, 0.5, 0.5], flops=1.0),
    ]


def test_every_head_picks_a_costlier_setting_when_one_head_fails():
    results = one_bad_head()
    assert cheapest_settings(results, 0.1).methods["m"].budget == 8
    pareto = cheapest_every_head(results, 0.1)
    assert pareto.every_head and pareto.methods["m"].budget == 16
    assert pareto.methods["m"].error == pytest.approx(0.09)  # its worst head
    assert pareto.methods["n"] is None
    assert cheapest_every_head(results, 0.05).methods["m"] is None


def test_every_head_is_over_every_layer():
    results = [
        record("m", 8, 0, [0.01] * 4, layer=0, flops=1.0),
        record("m", 8, 0, [0.01, 0.5, 0.01, 0.01], layer=1, flops=1.0),
        record("m", 16, 0, [0.05] * 4, layer=0, flops=2.0),
        record("m", 16, 0, [0.05] * 4, layer=1, flops=2.0),
    ]
    assert cheapest_every_head(results, 0.1).methods["m"].budget == 16


def test_report_target_error_every_head(tmp_path):
    path = saved(tmp_path, document(one_bad_head()))
    mean = invoke("report", path, "--target-error", "0.1", "--format", "json")
    every = invoke("report", path, "--target-error", "0.1", "--every-head", "--format", "json")
    assert mean.exit_code == 0 and every.exit_code == 0, every.output
    assert json.loads(mean.stdout)["pareto"]["methods"]["m"]["budget"] == 8
    assert "every_head" not in json.loads(mean.stdout)["pareto"]
    pareto = json.loads(every.stdout)["pareto"]
    assert pareto["every_head"] is True and pareto["methods"]["m"]["budget"] == 16
    table = invoke("report", path, "--target-error", "0.1", "--every-head")
    assert "every head's rel_spectral ≤ 0.1" in table.stdout
    assert "not reached (best 0.5" in table.stdout  # n's best worst head
    refused = invoke("report", path, "--every-head")
    assert refused.exit_code == 2 and "--target-error" in refused.output


# ---- the table on the command line --------------------------------------------------------------


def test_report_per_head_fits_80_columns(tmp_path):
    results = [
        record("streaming", 64, 0, [0.1, 0.4, 0.2, 0.3], density=[0.2, 0.25, 0.3, 0.35]),
        record("topk", 64, 0, [0.01, 0.04, 0.02, 0.03], density=[0.2] * 4),
    ]
    path = saved(tmp_path, document(results))
    res = invoke("report", path, "--per-head")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    start = next(i for i, line in enumerate(lines) if "worst" in line and "heads" in line)
    heads = [line.split("│")[4].strip() for line in lines[start:] if " b0 h" in line]
    assert heads == ["b0 h1", "b0 h3", "b0 h2", "b0 h1", "b0 h3", "b0 h2"]
    markdown = invoke("report", path, "--per-head", "--format", "markdown")
    assert "| streaming | 64 | 0.25 | b0 h1 | 0.4 | 0.25 |" in markdown.stdout
    as_json = invoke("report", path, "--per-head", "--format", "json")
    assert as_json.exit_code == 0 and "per_slice" in as_json.stdout
    assert as_json.stdout == invoke("report", path, "--format", "json").stdout  # the same JSON
    assert "worst-heads table is drawn in the table and Markdown" in as_json.stderr


def test_compare_per_head_on_a_real_run_fits_80_columns():
    spec = "synthetic:n=64,d=16,b=1,h=3,kind=clustered"
    res = invoke(
        "compare", spec, "--methods", "exact,topk,uniform", "--budgets", "8,16", "--seeds", "1",
        "--no-timing", "--per-head",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert any("the 3 worst of 3 heads by rel_spectral" in line for line in lines)
    approx = invoke("approx", spec, "-m", "topk", "-b", "8", "--no-timing", "--per-head")
    assert approx.exit_code == 0 and "worst" in approx.stdout
    picked = invoke(
        "compare", spec, "--methods", "topk", "--budgets", "8,48", "--seeds", "1", "--no-timing",
        "--target-error", "0.02", "--every-head", "--format", "json",
    )  # fmt: skip
    assert picked.exit_code == 0, picked.output
    doc = json.loads(picked.stdout)
    pick = doc["pareto"]["methods"]["topk"]
    worst = {r["budget"]: max(r["errors"]["rel_spectral"]["per_slice"]) for r in doc["results"]}
    assert doc["pareto"]["every_head"] and pick is not None
    assert pick["rel_spectral"] == pytest.approx(worst[pick["budget"]])
    assert pick["budget"] == min(b for b, w in worst.items() if w <= 0.02)  # topk: FLOPs grow


def test_per_head_reads_old_compare_documents_and_refuses_other_kinds():
    old = FIXTURES / "compare.json"
    res = invoke("report", old, "--per-head")
    assert res.exit_code == 0 and "worst" in res.stdout, res.output
    for kind in ("scale", "drift"):
        refused = invoke("report", FIXTURES / f"{kind}.json", "--per-head")
        assert refused.exit_code == 2 and f"this is a {kind} document" in refused.output


# ---- plot --x head -----------------------------------------------------------------------------


def test_plot_x_head_draws_each_heads_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from kdecli.experiments.compare.plot import figure

    slices = [0.1, 0.2, 0.3, 0.4, 0.3, 0.4, 0.5, 0.6]  # b=2: head h is the mean of h and h+4
    report = document([record("m", 8, 0, slices), record("m", 16, 0, [0.05] * 8)], b=2)
    fig = figure([report], x="head")
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_gid() == "method"}
    assert set(lines) == {"m @ 8", "m @ 16"}
    assert list(lines["m @ 8"].get_xdata()) == [0, 1, 2, 3]
    assert list(lines["m @ 8"].get_ydata()) == pytest.approx([0.2, 0.3, 0.4, 0.5])
    floor = next(line for line in ax.get_lines() if line.get_gid() == "floor")
    assert list(floor.get_ydata()) == pytest.approx([1.2, 1.3, 1.4, 1.5])
    out = tmp_path / "heads.png"
    res = invoke("plot", saved(tmp_path, report), "--x", "head", "-o", out)
    assert res.exit_code == 0, res.output
    assert out.read_bytes().startswith(b"\x89PNG")
    mixed = invoke("plot", saved(tmp_path, report), "--x", "head,budget", "-o", out)
    assert mixed.exit_code == 2


def test_plot_x_head_of_a_run_over_layers_is_a_layer_by_head_heat_map(tmp_path):
    pytest.importorskip("matplotlib")
    from kdecli.experiments.compare.plot import figure

    results = [
        record("m", 8, 0, [0.1, 0.2, 0.3, 0.4], layer=0),
        record("m", 8, 0, [0.5, 0.6, 0.7, 9.0], layer=1),
        record("n", 8, 0, [0.1] * 4, layer=0),
        record("n", 8, 0, [0.2] * 4, layer=1),
    ]
    report = document(results, layers=(0, 1))
    fig = figure([report], x="head")
    images = [im for ax in fig.axes for im in ax.get_images() if im.get_gid() == "heatmap"]
    assert len(images) == 2
    grid = images[0].get_array()
    assert grid.shape == (2, 4) and grid[1, 3] == pytest.approx(9.0) and grid[0, 0] == 0.1
    assert images[0].norm is images[1].norm  # one colour scale
    out = tmp_path / "heat.svg"
    res = invoke("plot", saved(tmp_path, report), "--x", "head", "-o", out)
    assert res.exit_code == 0, res.output
    assert "<svg" in out.read_text()
    two = invoke("plot", saved(tmp_path, report, "a.json"), saved(tmp_path, report, "b.json"),
                 "--x", "head", "-o", out)  # fmt: skip
    assert two.exit_code == 2 and "one run over layers" in two.output


def test_a_saved_run_round_trips_its_heads(tmp_path, measured):
    buffer = io.StringIO()
    render(measured, "json", buffer)
    path = tmp_path / "run.json"
    path.write_text(buffer.getvalue())
    assert worst_heads(load_document(path)) == worst_heads(measured)
