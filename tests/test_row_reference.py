"""The row-sampled reference (``--reference rows:R|auto``; docs/metrics.md): its interval is
honest, it is the full reference when it samples every row, and every report says it was used."""

import csv as csv_module
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import kdecli
from kdecli.cli import app
from kdecli.errors import UsageError
from kdecli.experiments.compare.aggregate import aggregate
from kdecli.experiments.compare.pareto import cheapest_settings
from kdecli.experiments.compare.records import RunReport, load_document, to_json
from kdecli.experiments.compare.report import render_text
from kdecli.masks import Causal
from kdecli.measure.config import RunConfig
from kdecli.measure.metrics import slice_errors
from kdecli.measure.reference import exact_attention
from kdecli.measure.row_reference import (
    AUTO_ROWS,
    BOOTSTRAP_DRAWS,
    FULL_REFERENCE_LIMIT,
    SOFTMAX_MACS_PER_LOGIT,
    RowSample,
    bootstrap_weights,
    draw_rows,
    full_reference_cost,
    parse_reference,
    resolve_reference,
    sample_rows,
)

runner = CliRunner()
CLI_SPEC = "synthetic:n=4096,d=16"


def shape(n, d=64, b=1, h=1):
    return {"b": b, "h": h, "n_q": n, "n_k": n, "d": d, "d_v": d}


# ---- the estimator ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coverage_input():
    qkv = kdecli.load_input("synthetic:n=2048,d=32,b=1,h=2")
    q, k, v = (t.to(torch.float64) for t in (qkv.q, qkv.k, qkv.v))
    scale = qkv.scale(None)
    return q, k, v, scale, exact_attention(q, k, v, scale)


@pytest.mark.parametrize("method", ["uniform", "kdeformer", "performer"])
def test_the_interval_covers_the_true_error_in_95_of_100_draws(coverage_input, method):
    q, k, v, scale, full = coverage_input
    out = kdecli.attention(
        q, k, v, method=method, budget=64, generator=torch.Generator().manual_seed(0)
    )
    truth = slice_errors(out, full)["rel_frobenius"]  # the full value, per slice
    covered = narrow = sliced = 0
    for draw in range(100):  # the exact rows are the full reference's (checked below)
        rows = draw_rows(full.shape[-2], 256, seed=10_000 + draw)
        weights = bootstrap_weights(256, BOOTSTRAP_DRAWS, seed=20_000 + draw)
        est = RowSample(rows, full[..., rows, :], weights, full.shape[-2], draw).estimate(out)
        covered += est.mean_low <= truth.mean() <= est.mean_high
        sliced += int(((est.low <= truth) & (truth <= est.high)).sum())
        # the same test on an interval half as wide: it must fail, or the test could not
        centre = est.rel_frobenius.mean()
        half = (est.mean_high - est.mean_low) / 4
        narrow += centre - half <= truth.mean() <= centre + half
    assert covered >= 85, covered
    assert sliced >= 170, sliced  # per slice, 2 slices × 100 draws
    assert narrow < 85, narrow


def test_rows_are_seeded_distinct_sorted_and_shared_by_every_slice():
    rows = draw_rows(1000, 100, seed=3)
    assert torch.equal(rows, draw_rows(1000, 100, seed=3))
    assert not torch.equal(rows, draw_rows(1000, 100, seed=4))
    assert rows.unique().numel() == 100 and torch.equal(rows, rows.sort().values)
    assert 0 <= int(rows.min()) and int(rows.max()) < 1000


@pytest.mark.parametrize("memory_bytes", [2**30, 3 * 8 * 4 * 97 * 5])  # one chunk; chunks of 5 rows
def test_causal_rows_are_the_full_causal_references_rows(memory_bytes):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 97, 21, generator=g, dtype=torch.float64) for _ in range(3))
    full = exact_attention(q, k, v, 0.3, mask=Causal(0))
    sample = sample_rows(q, k, v, 0.3, 31, seed=5, mask=Causal(0), memory_bytes=memory_bytes)
    assert torch.allclose(sample.exact, full[..., sample.rows, :], rtol=0, atol=1e-12)
    # and without the positions the first sampled rows would see later keys: the test can fail
    unmasked = exact_attention(q[..., sample.rows, :], k, v, 0.3)
    assert not torch.allclose(unmasked, full[..., sample.rows, :], atol=1e-6)


@pytest.mark.parametrize("memory_bytes", [2**30, 3 * 8 * 4 * 150 * 5])
def test_rows_after_a_prefix_keep_their_positions(memory_bytes):
    """Under Causal(offset) a sampled row i sits at offset + i, as in the full reference."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 64, 21, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 150, 21, generator=g, dtype=torch.float64) for _ in range(2))
    mask = Causal(70)
    full = exact_attention(q, k, v, 0.3, mask=mask)
    sample = sample_rows(q, k, v, 0.3, 20, seed=5, mask=mask, memory_bytes=memory_bytes)
    assert torch.allclose(sample.exact, full[..., sample.rows, :], rtol=0, atol=1e-12)
    at_zero = exact_attention(q[..., sample.rows, :], k, v, 0.3, mask=Causal(0))
    assert not torch.allclose(at_zero, full[..., sample.rows, :], atol=1e-6)


def test_an_exact_output_has_zero_error_and_a_zero_output_one():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 3, 200, 8, generator=g, dtype=torch.float64) for _ in range(3))
    sample = sample_rows(q, k, v, 0.5, 40, seed=0)
    exact = exact_attention(q, k, v, 0.5)
    assert float(sample.estimate(exact).rel_frobenius.abs().max()) < 1e-12
    zero = sample.estimate(torch.zeros_like(exact))
    assert torch.allclose(zero.rel_frobenius, torch.ones(1, 3, dtype=torch.float64))
    assert zero.mean_low == pytest.approx(1) and zero.mean_high == pytest.approx(1)


# ---- choosing the reference ------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["rows:0", "rows:x", "nope", "rows:", "rows:-3", "rows:1.5", ""])
def test_bad_specs_are_usage_errors_that_name_the_allowed_ones(bad):
    with pytest.raises(UsageError, match="full, rows:R") as info:
        parse_reference(bad)
    assert "\n" not in info.value.message
    with pytest.raises(UsageError):
        RunConfig(reference=bad).check()


def test_auto_is_full_up_to_the_limit_and_rows_beyond():
    assert str(resolve_reference("auto", shape(16384))) == "full"
    assert str(resolve_reference("auto", shape(131072))) == f"rows:{AUTO_ROWS}"
    assert str(resolve_reference("auto", shape(16384, b=8, h=8))) == f"rows:{AUTO_ROWS}"  # ×b·h
    # the boundary: n² (2d + softmax) at the limit is full, one key more is rows
    per_logit = 2 * 64 + SOFTMAX_MACS_PER_LOGIT
    n_q = int(FULL_REFERENCE_LIMIT // (per_logit * 1000))
    at_limit = {**shape(1000), "n_q": n_q}
    assert full_reference_cost(at_limit) <= FULL_REFERENCE_LIMIT
    assert str(resolve_reference("auto", at_limit)) == "full"
    assert str(resolve_reference("auto", {**at_limit, "n_k": 1001})).startswith("rows:")
    # explicit choices stand, but a sample of every row is the full reference
    assert str(resolve_reference("full", shape(131072))) == "full"
    assert str(resolve_reference("rows:512", shape(4096))) == "rows:512"
    assert str(resolve_reference("rows:4096", shape(4096))) == "full"


# ---- through the runner ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    return kdecli.load_input("synthetic:n=512,d=16,b=1,h=2")


def test_rows_as_many_as_the_queries_equal_the_full_reference(small):
    run = dict(methods=["mean", "uniform"], budgets=[16], timing=False)
    full = kdecli.compare(small, reference="full", **run)
    every = kdecli.compare(small, reference="rows:512", **run)
    assert every.reference.mode == "full" and every.reference.requested == "rows:512"
    assert [r.errors for r in every.results] == [r.errors for r in full.results]
    assert every.floors == full.floors


def test_what_rows_measure_and_what_they_cannot(small):
    run = dict(methods=["mean", "uniform", "performer"], budgets=[16], timing=False, seeds=2)
    full = kdecli.compare(small, reference="full", bound=True, **run)
    rows = kdecli.compare(small, reference="rows:128", bound=True, **run)
    assert rows.reference.to_dict() == {
        "mode": "rows",
        "rows": 128,
        "seed": 0,
        "requested": "rows:128",
        "interval": {"method": "bootstrap", "draws": 1000, "level": 0.95},
    }
    for sampled, whole in zip(rows.results, full.results):
        for metric in ("rel_spectral", "bound_normalized"):
            summary = sampled.errors[metric]
            assert summary.mean is None and summary.max is None
            assert "not available under a row-sampled reference" in summary.note
        worst = sampled.errors["max_row_rel"]
        assert worst.lower_bound and worst.max <= whole.errors["max_row_rel"].max
        for got, every in zip(worst.per_slice, whole.errors["max_row_rel"].per_slice):
            assert got <= every
        frob = sampled.errors["rel_frobenius"]
        assert frob.interval.low <= frob.mean <= frob.interval.high
        assert len(frob.interval.per_slice_low) == 2
    # the floors are measured on the same rows: the mean method's record (float32) is the mean
    # floor (float64), interval and all
    got = next(r for r in rows.results if r.method == "mean").errors["rel_frobenius"]
    want = rows.floors.mean["rel_frobenius"]
    for a, b in ((got.mean, want.mean), (got.interval.low, want.interval.low)):
        assert a == pytest.approx(b, rel=1e-6)
    floor = rows.floors.mean_floor("rel_frobenius")
    for record in rows.results:
        if record.role != "baseline":
            assert record.beats_mean_floor == (record.error("rel_frobenius") < floor)


def test_the_seed_mean_interval_is_the_mean_of_the_seeds_bounds(small):
    rows = kdecli.compare(small, ["performer"], [16], reference="rows:128", timing=False, seeds=3)
    (setting,) = aggregate(rows.results, metric="rel_frobenius")
    intervals = [r.errors["rel_frobenius"].interval for r in rows.results]
    stats = setting.errors["rel_frobenius"]
    assert stats.low == pytest.approx(sum(i.low for i in intervals) / 3)
    assert stats.high == pytest.approx(sum(i.high for i in intervals) / 3)
    assert "rel_spectral" not in setting.errors and setting.unavailable("rel_spectral")


def test_target_error_and_plots_use_rel_frobenius_under_rows(small, tmp_path):
    pytest.importorskip("matplotlib")
    from kdecli.experiments.compare.plot import figure

    rows = kdecli.compare(
        small, ["mean", "uniform"], [8, 64], reference="rows:128", timing=False, seeds=2
    )
    pareto = cheapest_settings(rows.results, 10.0)
    assert pareto.metric == "rel_frobenius" and pareto.methods["uniform"] is not None
    fig = figure([rows], "budget")  # asked for rel_spectral (the default): falls back
    (ax,) = fig.axes[:1]
    assert [c for c in ax.collections if c.get_gid() == "interval"]
    caption = next(t.get_text() for t in fig.texts if t.get_gid() == "caption")
    assert "rel_frobenius is drawn instead" in " ".join(caption.split())


def test_documents_without_a_reference_field_read_as_full(small):
    doc = kdecli.compare(small, ["mean"], [], reference="full", timing=False).to_dict()
    del doc["reference"]
    report = RunReport.from_dict(doc)
    assert report.reference.mode == "full" and not report.reference.sampled
    assert "reference: full" in render_text(report, "table", width=200)


# ---- the command line ------------------------------------------------------------------------


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_a_rows_document_round_trips_through_report(tmp_path):
    path = tmp_path / "rows.json"
    res = invoke(
        "compare", CLI_SPEC, "--methods", "mean,uniform", "--budgets", 64,
        "--reference", "rows:512", "-f", "json", "-o", path, "--no-timing",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(path.read_text())
    assert doc["reference"]["mode"] == "rows" and doc["reference"]["rows"] == 512
    assert doc["results"][1]["errors"]["rel_spectral"]["mean"] is None
    # nothing lost in reading it back; the summary is derived from the results, so recomputed
    assert json.loads(to_json(load_document(path))) == doc

    table = invoke("report", path)
    assert table.exit_code == 0, table.stderr
    text = " ".join(table.stdout.split())
    settings = aggregate(load_document(path).results, metric="rel_frobenius")
    uniform = next(s for s in settings if s.method == "uniform").errors["rel_frobenius"]
    lines = table.stdout.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("│ uniform"))
    column = lines[row].index(f"{uniform.mean:.4f} ± {uniform.std:.4f}")  # 3 seeds
    interval = f"[{uniform.low:.4f}, {uniform.high:.4f}]"  # under the estimate
    assert lines[row + 1][column:].startswith(interval)
    assert "reference: rows:512" in text and "n/a (rows)" in text and "≥ " in text
    assert "bootstrap interval" in text

    markdown = invoke("report", path, "-f", "markdown").stdout
    assert "reference: rows:512" in markdown and "n/a (rows)" in markdown
    csv = invoke("report", path, "-f", "csv").stdout.splitlines()
    header = csv[0].split(",")
    assert {"rel_frobenius_low", "rel_frobenius_high", "reference"} <= set(header)
    row = next(csv_module.DictReader(csv))
    assert row["reference"] == "rows:512"
    assert invoke("report", path, "-f", "json").stdout.strip() == json.dumps(doc, indent=2)


@pytest.mark.parametrize("command", ["compare", "approx"])
@pytest.mark.parametrize("bad", ["rows:0", "rows:x", "nope"])
def test_bad_specs_exit_2_with_one_line(command, bad):
    res = invoke(command, "synthetic:n=64,d=8", "--reference", bad)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --reference must be") and bad in lines[0]


def test_the_full_reference_says_so_too():
    res = invoke("approx", "synthetic:n=64,d=8", "-m", "uniform", "-b", 8, "--no-timing")
    assert res.exit_code == 0, res.stderr
    assert "reference: full (--reference auto): the exact float64 output of every query." in (
        " ".join(res.stdout.split())
    )
    assert math.isfinite(FULL_REFERENCE_LIMIT)
