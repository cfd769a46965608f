"""`kdecli scale --target-error E`: each method's smallest budget meeting E at each length.

The answer is checked against measurements made apart from the search (a plain ``compare`` at
the answer and at the grid value below it), the search against a fake error curve, the crop
against a file holding only the first n positions, and the refusals as one-line usage errors.
"""

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from kdecli.cli import app
from kdecli.errors import UsageError
from kdecli.experiments.compare.run import compare
from kdecli.experiments.documents import load_any
from kdecli.experiments.scale.records import ScaleReport
from kdecli.experiments.scale.report import render_text
from kdecli.experiments.scale.run import input_at
from kdecli.experiments.scale.tolerable import (
    answer_of,
    budget_grid,
    parse_budgets,
    smallest_meeting,
    tolerable_budgets,
)
from kdecli.experiments.scale.tolerable_records import Probe, Tolerable, TolerableSearch
from kdecli.experiments.scale.tolerable_report import verdict
from kdecli.measure.config import RunConfig

runner = CliRunner()
PEAKED = "synthetic:d=8,h=2,kind=clustered,seed=1"  # peaked attention: topk's error falls fast
LENGTHS = [128, 256]


def _error(spec: str, n: int, method: str, budget: int, config: RunConfig) -> float:
    """The mean over seeds of the slice-mean rel_spectral, measured apart from the search."""
    run = compare(input_at(spec, n), [method], [budget], config)
    errors = [r.error("rel_spectral") for r in run.results]
    return sum(errors) / len(errors)


# ---- the search on its own ----------------------------------------------------------------


def test_the_default_grid_is_the_powers_of_two_from_16_up_to_n_and_n():
    assert budget_grid(128) == [16, 32, 64, 128]
    assert budget_grid(100) == [16, 32, 64, 100]
    assert budget_grid(256, [8, 300, 64]) == [8, 64]
    assert parse_budgets("64, 16,64") == [16, 64]
    for bad in ("", "0", "16,x", "-4"):
        with pytest.raises(UsageError):
            parse_budgets(bad)


@pytest.mark.parametrize("threshold", [1, 16, 17, 40, 64, 65])
def test_bisection_finds_the_smallest_grid_value_of_a_monotone_curve(threshold):
    grid = [1, 2, 4, 8, 16, 32, 64]
    asked = []

    def meets(budget):
        asked.append(budget)
        return budget >= threshold

    found = smallest_meeting(grid, meets, "bisect")
    expected = next((b for b in grid if b >= threshold), None)
    assert found == expected
    assert len(asked) == 3  # ⌈log₂(7 + 1)⌉ halvings
    assert (grid[-1] in asked) == (threshold > grid[-2])  # the largest only when all below miss
    assert smallest_meeting(grid, lambda b: b >= threshold, "all") == expected


def test_a_curve_that_does_not_fall_is_marked_and_search_all_finds_its_smallest():
    """Bisection assumes the error falls with the budget; its probes show when it does not."""
    grid = [16, 32, 64, 128]
    error = {16: 0.05, 32: 0.3, 64: 0.3, 128: 0.0}  # meets at 16, misses at 32 and 64
    meets = {b: e <= 0.1 for b, e in error.items()}
    assert smallest_meeting(grid, meets.__getitem__, "all") == 16
    probes = [Probe(256, "m", b, "ok", e, e, meets[b]) for b, e in error.items()]
    answer = answer_of(256, "m", grid, 16, probes)
    assert answer.budget == 16 and answer.below_grid and not answer.monotone
    assert answer_of(256, "m", grid, 128, probes[2:]).monotone


def _answers(method, budgets, lengths=(1024, 2048, 4096)):
    return [
        Tolerable(n, method, b, None if b is None else b / n, 0.05, n, b == 16)
        for n, b in zip(lengths, budgets)
    ]


def test_the_verdict_follows_each_methods_density_across_every_length():
    lengths = [1024, 2048, 4096]
    cases = {
        "falls": ([128, 128, 256], "sparser"),  # 12.5 % → 6.25 % → 6.25 %
        "rises": ([64, 256, 1024], "denser"),
        "wobbles": ([1024, 1024, 4096], "varies"),  # 100 % → 50 % → 100 %: not "same"
        "full": ([1024, 2048, 4096], "only at n"),
        "tiny": ([16, 32, 64], "below the grid"),
        "misses": ([None, None, None], "never"),
    }
    record = TolerableSearch(0.1, "rel_spectral", methods=list(cases))
    for method, (budgets, _) in cases.items():
        record.budgets += _answers(method, budgets)
    report = ScaleReport("x", None, lengths, tolerable=record)
    found = verdict(report)
    assert {t.method: t.direction for t in found.trends} == {m: d for m, (_, d) in cases.items()}
    text = found.text(" ")
    assert "tolerate more sparsity for falls (12.5 % at n = 1,024 → 6.25 % at n = 4,096)" in text
    assert "no single direction for wobbles (100 % → 50 % → 100 %)" in text
    assert found.sparsest == "tiny" and "is tiny: budget 64 (1.56 % of the keys)" in text


# ---- the answer against independent measurements ------------------------------------------


@pytest.fixture(scope="module")
def peaked():
    config = RunConfig(seeds=1, causal=True, timing=False, diagnostics=False)
    report = tolerable_budgets(PEAKED, ["topk", "streaming"], LENGTHS, 0.2, config)
    return report, config


def test_the_smallest_budget_is_the_smallest_grid_value_meeting_the_target(peaked):
    report, config = peaked
    record = report.tolerable
    assert report.lengths == LENGTHS and record.metric == "rel_spectral"
    checked = 0
    for n in LENGTHS:
        grid = budget_grid(n)
        for method in ("topk", "streaming"):
            answer = record.answer(method, n)
            assert answer is not None and answer.budget is not None, (method, n)
            assert answer.density == answer.budget / n
            at = _error(PEAKED, n, method, answer.budget, config)
            assert at <= 0.2 and at == pytest.approx(answer.error, rel=1e-9)
            index = grid.index(answer.budget)
            if index > 0:  # the grid value below misses, measured apart from the search
                assert _error(PEAKED, n, method, grid[index - 1], config) > 0.2
                checked += 1
            else:
                assert answer.below_grid
    assert checked >= 2  # the test compared at least two neighbours
    assert any(a.budget < a.n for a in record.budgets)  # not only the trivial answer n


def test_every_point_measured_is_kept_with_the_figure_it_was_judged_on(peaked):
    report, _ = peaked
    record = report.tolerable
    for p in record.probes:
        assert p.status == "ok" and p.meets == (p.error <= 0.2)
        assert p.worst_head >= p.error - 1e-12  # the largest slice is at least the mean
    for n in LENGTHS:  # bisection measures fewer than the whole grid
        measured = {p.budget for p in record.probes_of("topk", n)}
        assert len(measured) < len(budget_grid(n))


def test_every_head_asks_more_of_a_method_than_the_mean(peaked):
    report, config = peaked
    strict = tolerable_budgets(PEAKED, ["topk"], LENGTHS, 0.2, config, every_head=True)
    for n in LENGTHS:
        mean, every = report.tolerable.answer("topk", n), strict.tolerable.answer("topk", n)
        assert every.budget >= mean.budget
        assert every.error <= 0.2  # the worst head's figure
    assert strict.tolerable.criterion == "every head"


def test_search_all_measures_every_budget_and_agrees_where_the_error_falls(peaked):
    report, config = peaked
    every = tolerable_budgets(PEAKED, ["topk"], LENGTHS, 0.2, config, search="all")
    for n in LENGTHS:
        probes = every.tolerable.probes_of("topk", n)
        assert [p.budget for p in probes] == budget_grid(n)
        smallest = next(p.budget for p in probes if p.meets)
        assert every.tolerable.answer("topk", n).budget == smallest
        assert report.tolerable.answer("topk", n).budget == smallest  # bisection's answer


def test_decode_searches_the_last_queries_over_a_cache_of_n_keys(peaked):
    _, config = peaked
    decode = RunConfig(seeds=1, phase="decode", queries=4, timing=False, diagnostics=False)
    report = tolerable_budgets(PEAKED, ["topk"], LENGTHS, 0.2, decode)
    assert report.phase == "decode"
    for info in report.tolerable.lengths:
        assert info.input.phase == "decode" and info.input.shape.n_q == 4
        assert info.input.shape.n_k == info.n
    assert "decode: the last 4 queries" in render_text(report, "markdown")
    with pytest.raises(UsageError, match="more than the shortest cache"):
        tolerable_budgets(PEAKED, ["topk"], [2, 8], 0.2, decode)


def test_none_when_even_the_largest_budget_misses(peaked):
    _, config = peaked
    report = tolerable_budgets(PEAKED, ["streaming"], LENGTHS, 0.01, config, budgets=[16, 32])
    for n in LENGTHS:
        answer = report.tolerable.answer("streaming", n)
        assert answer.budget is None and answer.density is None and answer.largest == 32
        assert [p.budget for p in report.tolerable.probes_of("streaming", n)] == [16, 32]
    text = render_text(report, "table", width=160)
    assert "none (> 32)" in text
    assert "no budget of the grid meets E at any length for streaming" in text
    assert verdict(report).trends[0].direction == "never"


# ---- the input at each length -----------------------------------------------------------------


def _write_capture(path, q, k, v):
    with h5py.File(path, "w") as f:
        group = f.create_group("layer0")
        for name, array in zip("qkv", (q, k, v)):
            group[name] = array
        group.attrs.update(causal=True, layer=0, scale=0.5)


def test_a_capture_is_cropped_to_its_first_n_positions_under_its_causal_mask(tmp_path):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 2, 300, 8)).astype(np.float32) for _ in range(3))
    k[..., 128:, :] *= 5.0  # later positions unlike the first: a crop elsewhere would show
    _write_capture(tmp_path / "long.h5", q, k, v)
    _write_capture(tmp_path / "short.h5", q[..., :128, :], k[..., :128, :], v[..., :128, :])
    config = RunConfig(seeds=1)
    long, short = (
        tolerable_budgets(f"{tmp_path / name}:/layer0", ["topk"], [64, 128], 0.3, config)
        for name in ("long.h5", "short.h5")
    )
    info = long.tolerable.lengths[0].input
    assert info.shape.n_q == info.shape.n_k == 64 and info.causal and info.scale == 0.5
    assert [p.error for p in long.tolerable.probes] == [p.error for p in short.tolerable.probes]
    assert long.tolerable.budgets == short.tolerable.budgets
    notes = render_text(long, "markdown")
    assert "the first n positions of the input" in notes and "causal prefill" in notes


# ---- the document and the command -------------------------------------------------------------


def test_the_command_writes_a_scale_document_that_reads_back_and_renders(tmp_path):
    out = tmp_path / "tolerable.json"
    result = runner.invoke(app, ["scale", PEAKED, "--n", "64,128", "--target-error", "0.2",
                                 "--methods", "topk", "--format", "json", "-o", str(out), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["kind"] == "scale" and doc["schema_version"] == 1 and doc["runs"] == []
    assert doc["tolerable"]["target_error"] == 0.2 and doc["summary"]["sentences"]
    report = load_any(out)
    assert report.tolerable.budgets[0].method == "topk" and report.lengths == [64, 128]
    assert report.environment is not None
    shown = runner.invoke(app, ["report", str(out), "--format", "csv"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.strip().splitlines()
    assert lines[0].startswith("n,method,budget,density")
    assert len(lines) == 1 + len(report.tolerable.probes)
    table = runner.invoke(app, ["report", str(out)])
    assert "smallest budget with rel_spectral ≤ 0.2" in table.output


def test_the_plot_draws_density_against_n(tmp_path, peaked):
    pytest.importorskip("matplotlib")
    from kdecli.experiments.scale.plot import figure, plot_scale

    report, _ = peaked
    fig = figure(report)
    lines = [line for line in fig.axes[0].get_lines() if line.get_gid() == "method"]
    assert {line.get_label() for line in lines} == {"topk", "streaming"}
    topk = next(line for line in lines if line.get_label() == "topk")
    expected = [report.tolerable.answer("topk", n).density for n in LENGTHS]
    assert list(topk.get_ydata()) == expected
    assert plot_scale(report, tmp_path / "t.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target-error", "0"], "--target-error must be a positive number"),
        (["--target-error", "-0.1"], "--target-error must be a positive number"),
        (["--target-error", "0.1", "--n", "64,100000"], "--n must be in [1, 300]"),
        (["--budgets", "16"], "go with --target-error"),
        (["--target-error", "0.1", "--budget", "16"], "give the grid with --budgets"),
        (["--target-error", "0.1", "--methods", "mean"], "mean takes none"),
        (["--target-error", "0.1", "--budgets", "1000"], "no budget is at most n = 64"),
        (["--target-error", "0.1", "--search", "half"], "--search must be one of"),
    ],
)
def test_bad_requests_are_one_line_usage_errors(tmp_path, args, message):
    rng = np.random.default_rng(0)
    _write_capture(tmp_path / "c.h5", *(rng.normal(size=(1, 1, 300, 8)) for _ in range(3)))
    base = ["scale", f"{tmp_path / 'c.h5'}:/layer0", "--n", "64,128", "--methods", "topk", "-q"]
    result = runner.invoke(app, base + args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.output.strip().splitlines()[0].startswith("Error:")
