"""`compare --target-error`: each method's cheapest setting that reaches a target error."""

import io
import json
import math

import pytest
from typer.testing import CliRunner

from kdecli.cli import app
from kdecli.errors import UsageError
from kdecli.experiments.compare.pareto import cheapest_settings, check_target_error
from kdecli.experiments.compare.records import RunReport
from kdecli.experiments.compare.report import render

ENVIRONMENT = {"device": "cpu", "device_name": "x", "dtype": "float32", "threads": 1, "torch": "t"}

runner = CliRunner()


def record(method, budget, errors, flops, seconds=None, status="ok", seed=0, params=None):
    """One result record; ``errors`` is the slice-mean rel_spectral of this seed."""
    return {
        "method": method,
        "budget": budget,
        "seed": seed,
        "params": params or {"m": budget},
        "status": status,
        "reason": None if status == "ok" else "because",
        "errors": {}
        if status != "ok"
        else {"rel_spectral": {"mean": errors, "max": errors, "per_slice": [errors]}},
        "time": None
        if seconds is None
        else {"method_s": {"median": seconds}, "exact_s": None, "speedup": None},
        "flops": flops,
    }


def document(records):
    return {
        "schema_version": 1,
        "environment": ENVIRONMENT,
        "input": {
            "source": "hand",
            "scale": 0.5,
            "causal": False,
            "shape": {"b": 1, "h": 1, "n_q": 4, "n_k": 4, "d": 2, "d_v": 2},
        },
        "floors": {
            "mean": {m: {"mean": 0.3} for m in ("rel_spectral", "rel_frobenius", "max_row_rel")},
            "zero": {},
        },
        "results": records,
    }


@pytest.fixture
def results():
    return RunReport.from_dict(document(RECORDS)).results


RECORDS = [
    # a: error falls with the budget; 0.2 at budget 16 reaches a target of 0.2 (inclusive)
    record("a", 8, 0.5, 100.0),
    record("a", 16, 0.2, 200.0),
    record("a", 32, 0.1, 400.0),
    # b: two settings with equal FLOPs: the faster wins
    record("b", 8, 0.15, 100.0, seconds=2.0),
    record("b", 16, 0.12, 100.0, seconds=1.0),
    # c: one seed below the target, but the seed mean (0.225) is not
    record("c", 8, 0.10, 50.0, seed=0),
    record("c", 8, 0.35, 50.0, seed=1),
    # d: the cheap setting failed on one seed, so it does not count
    record("d", 8, 0.05, 10.0, seed=0),
    record("d", 8, None, 10.0, seed=1, status="oom"),
    record("d", 16, 0.05, 20.0, seconds=0.5, seed=0),
    record("d", 16, 0.07, 20.0, seconds=0.5, seed=1),
    # e: no cost model (flops None) ranks after any setting with one
    record("e", 8, 0.1, None, seconds=0.1),
    record("e", 16, 0.1, 1e9, seconds=9.0),
    # f: never reaches it
    record("f", None, 0.9, 5.0, params={}),
]


def test_cheapest_setting_per_method(results):
    pareto = cheapest_settings(results, 0.2).to_dict()
    assert pareto["target_error"] == 0.2 and pareto["metric"] == "rel_spectral"
    picks = pareto["methods"]
    assert list(picks) == ["a", "b", "c", "d", "e", "f"]
    assert picks["a"] == {
        "budget": 16,
        "params": {"m": 16},
        "flops": 200.0,
        "rel_spectral": 0.2,
        "method_s": None,
    }
    assert picks["b"]["budget"] == 16 and picks["b"]["method_s"] == 1.0
    assert picks["c"] is None
    assert picks["d"]["budget"] == 16 and picks["d"]["rel_spectral"] == pytest.approx(0.06)
    assert picks["e"]["budget"] == 16 and picks["e"]["flops"] == 1e9
    assert picks["f"] is None


def test_a_looser_target_picks_cheaper_settings(results):
    picks = cheapest_settings(results, 0.5).to_dict()["methods"]
    assert picks["a"]["budget"] == 8 and picks["c"]["rel_spectral"] == pytest.approx(0.225)
    assert cheapest_settings(results, 0.01).methods == dict.fromkeys("abcdef")


@pytest.mark.parametrize("bad", [0, -0.1, math.nan, math.inf, True, "0.1"])
def test_bad_targets_are_refused(bad):
    with pytest.raises(UsageError, match="--target-error must be a positive number"):
        check_target_error(bad)


def test_report_renders_pareto_in_every_format(results):
    report = RunReport.from_dict(document(RECORDS))
    report.pareto = cheapest_settings(results, 0.2)
    doc = json.loads(_render(report, "json"))
    assert doc["pareto"]["methods"]["a"]["budget"] == 16 and doc["pareto"]["methods"]["c"] is None
    lines = [json.loads(line) for line in _render(report, "jsonl").splitlines()]
    assert "pareto" not in lines[0] and lines[-1]["type"] == "pareto"
    assert lines[-1]["methods"]["b"]["method_s"] == 1.0
    table = _render(report, "table")
    assert "cheapest setting with seed-mean rel_spectral ≤ 0.2" in table
    assert "not reached (best 0.2250)" in table and "not reached (best 0.9000)" in table
    report.pareto = None
    assert "pareto" not in json.loads(_render(report, "json"))


def _render(report, fmt):
    buffer = io.StringIO()
    render(report, fmt, buffer)
    return buffer.getvalue()


def test_compare_target_error_option():
    spec = "synthetic:n=64,d=8,kind=clustered"
    args = [
        "compare",
        spec,
        "--methods",
        "exact,mean,uniform",
        "--budgets",
        "8,32,64",
        "--seeds",
        "2",
        "--no-timing",
    ]
    res = runner.invoke(app, [*args, "--target-error", "0.5", "--format", "json"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    picks = doc["pareto"]["methods"]
    assert set(picks) == {"exact", "mean", "uniform"} and picks["exact"]["budget"] is None
    assert picks["uniform"] is None or picks["uniform"]["rel_spectral"] <= 0.5
    assert doc["pareto"]["target_error"] == 0.5
    res = runner.invoke(app, [*args, "--target-error", "0.5"])
    assert "cheapest setting with seed-mean rel_spectral ≤ 0.5" in res.stdout
    res = runner.invoke(app, [*args, "--target-error", "0"])
    assert res.exit_code == 2 and "--target-error must be a positive number" in res.stderr
    res = runner.invoke(app, [*args, "--format", "json"])
    assert "pareto" not in json.loads(res.stdout)
