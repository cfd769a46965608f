import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

import kdecli
from kdecli.cli import app
from kdecli.errors import ParameterError, UsageError
from kdecli.experiments.compare.plan import plan_grid
from kdecli.experiments.compare.records import SCHEMA_VERSION
from kdecli.experiments.compare.report import render, to_csv, to_json
from kdecli.experiments.compare.run import compare_layers
from kdecli.measure.config import RunConfig
from kdecli.measure.seeds import derive_seed
from kdecli.methods import registry
from kdecli.methods.base import AttentionMethod


class Broken(AttentionMethod):
    name = "broken"
    summary = paper = "test only"
    randomized = True

    def forward_full(self, q, k, v, scale, generator):
        raise RuntimeError("kaboom\nsecond line")


class NaNs(AttentionMethod):
    name = "nans"
    summary = paper = "test only"

    def forward_full(self, q, k, v, scale, generator):
        return torch.full((*q.shape[:-1], v.shape[-1]), float("nan"), dtype=q.dtype)


@pytest.fixture
def qkv():
    return kdecli.load_input("synthetic:n=97,nq=59,d=21,dv=13,b=2,h=2,kind=clustered")


def test_one_failing_method_does_not_lose_the_others(qkv, monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "broken", Broken)
    monkeypatch.setitem(registry._REGISTRY, "nans", NaNs)
    report = kdecli.compare(qkv, ["exact", "broken", "nans", "kdeformer"], [16], seeds=2, repeats=1)
    by = {}
    for r in report.results:
        by.setdefault(r.method, []).append(r)
    assert [r.status for r in by["broken"]] == ["error", "error"]
    assert by["broken"][0].reason == "RuntimeError: kaboom"
    assert by["nans"][0].status == "error" and "non-finite" in by["nans"][0].reason
    assert all(r.status == "ok" for r in by["kdeformer"]) and len(by["kdeformer"]) == 2
    doc = json.loads(to_json(report))  # strict JSON: no NaN
    assert doc["schema_version"] == SCHEMA_VERSION and len(doc["results"]) == 6
    assert "nans" in to_csv(report)


def test_unsupported_input_is_a_status(qkv):
    report = kdecli.compare(qkv, ["kdeformer"], [16], causal=False, timing=False)
    assert report.results[0].status == "ok"
    square = kdecli.load_input("synthetic:n=47,d=8")
    report = kdecli.compare(
        square,
        ["exact", "reformer"],
        [16],
        causal=True,
        timing=False,
        params={"reformer": {"shared_qk": True}},  # the original's shared-QK mode is not causal
    )
    statuses = {r.method: r.status for r in report.results}
    assert statuses == {"exact": "ok", "reformer": "unsupported"}
    assert "causal" in report.results[1].reason


def test_records_have_the_documented_fields(qkv):
    report = kdecli.compare(qkv, ["mean", "kdeformer"], [16, 32], seeds=2, repeats=2, bound=True)
    doc = report.as_dict()
    assert set(doc) >= {
        "schema_version",
        "kdecli_version",
        "environment",
        "input",
        "floors",
        "results",
    }
    assert set(doc["environment"]) >= {"torch", "device", "device_name", "dtype", "threads"}
    assert set(doc["input"]) >= {"source", "shape", "layout", "scale", "causal"}
    assert doc["input"]["scale"] == pytest.approx(21**-0.5)
    rec = doc["results"][-1]
    assert set(rec) >= {
        "method",
        "budget",
        "seed",
        "params",
        "status",
        "reason",
        "errors",
        "time",
        "flops",
    }
    assert rec["params"] == {
        "block_size": 16,
        "samples": 32,
        "num_projs": 7,
        "pairing": "auto",
        "sampling": "value-norm",
        "causal_leaf": 32,
    }
    assert set(rec["errors"]) == {
        "rel_spectral",
        "rel_frobenius",
        "max_row_rel",
        "bound_normalized",
    }
    assert len(rec["errors"]["rel_spectral"]["per_slice"]) == 4
    assert set(rec["time"]) == {"method_s", "exact_s", "speedup"}
    assert rec["role"] == "approximation" and doc["results"][0]["role"] == "baseline"
    assert rec["environment"] == doc["environment"]  # schema 2: each result says where it ran
    assert rec["time"]["method_s"]["repeats"] == 2
    assert [r["seed"] for r in doc["results"]] == [None, 0, 1, 0, 1]
    assert doc["floors"]["zero"]["rel_spectral"]["mean"] == pytest.approx(1.0)
    mean_floor = doc["floors"]["mean"]["rel_spectral"]["mean"]
    mean_row = doc["results"][0]["errors"]["rel_spectral"]["mean"]
    assert mean_row == pytest.approx(mean_floor, rel=1e-6)


def test_seeds_are_reproducible_and_per_method(qkv):
    a = kdecli.compare(qkv, ["kdeformer"], [16], seeds=2, timing=False).results
    b = kdecli.compare(qkv, ["mean", "kdeformer"], [16], seeds=2, timing=False).results[1:]
    assert [r.errors for r in a] == [r.errors for r in b]
    assert a[0].errors != a[1].errors
    assert derive_seed(0, "kdeformer") != derive_seed(0, "performer")


def test_usage_errors_before_running(qkv):
    with pytest.raises(UsageError, match="larger than the number of keys"):
        kdecli.compare(qkv, ["kdeformer"], [98])
    with pytest.raises(UsageError, match="Did you mean `kdeformer`"):
        kdecli.compare(qkv, ["kdeformr"], [16])
    with pytest.raises(ParameterError, match="`samples`"):
        kdecli.compare(qkv, ["kdeformer"], [16], params={"kdeformer": {"samples": 0}})
    with pytest.raises(ParameterError, match="no method run here has a parameter named nope"):
        kdecli.compare(qkv, ["kdeformer"], [16], params={"*": {"nope": 1}})


def test_table_shows_floors_scale_and_marks(qkv):
    import io

    report = kdecli.compare(qkv, ["exact", "kdeformer"], [16], seeds=2, repeats=1)
    buffer = io.StringIO()
    render(report, "table", buffer, width=250)
    text = buffer.getvalue()
    assert "scale=0.218218" in text and "floors: mean-of-V baseline rel_spectral" in text
    assert "zero output 1" in text and "block_size=8 samples=16" in text
    floor = report.floors.mean_floor()
    kde = sum(r.error("rel_spectral") for r in report.results[1:]) / 2
    assert ("not below mean floor" in text) == (kde >= floor)


def test_attention_is_a_drop_in_for_sdpa():
    q, k, v = (torch.randn(3, 2, 5, 40, 16, dtype=torch.float64) for _ in range(3))
    out = kdecli.attention(q, k, v, method="kdeformer", budget=8, block_size=40)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.shape == ref.shape and (out - ref).abs().max() < 1e-10


class Counted(AttentionMethod):
    """Counts how often it is built."""

    name = "counted"
    summary = paper = "test only"
    randomized = True
    built = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        type(self).built += 1

    def forward_full(self, q, k, v, scale, generator):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def test_the_plan_is_made_once_and_each_method_built_once_per_job(qkv, monkeypatch):
    """compare_layers over two layers, two budgets, two seeds: four jobs, four method objects;
    the CLI's config is checked once, however many layers below read it."""
    monkeypatch.setitem(registry._REGISTRY, "counted", Counted)
    monkeypatch.setattr(Counted, "built", 0)
    layers = [replace(qkv, layer=0), replace(qkv, layer=1, q=qkv.q.flip(-2))]
    grid = plan_grid(layers, ["counted"], [8, 16], RunConfig(seeds=2, timing=False))
    assert Counted.built == 4 and len(grid.jobs) == 4
    report = compare_layers(layers, config=RunConfig(seeds=2, timing=False), jobs=grid.jobs)
    assert Counted.built == 4 and [r.key for r in report.results] == grid.keys
    checks = []
    real = RunConfig.check
    monkeypatch.setattr(RunConfig, "check", lambda self: checks.append(1) or real(self))
    args = ["compare", "synthetic:n=47,d=8", "--methods", "counted", "--budgets", "8",
            "--seeds", "2", "--no-timing", "-f", "json"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(checks) == 1 and Counted.built == 5


def test_only_filters_the_planned_jobs(qkv):
    grid = plan_grid([qkv], ["exact", "uniform"], [8], RunConfig(seeds=2, timing=False))
    wanted = {grid.keys[-1]}
    report = kdecli.compare(qkv, config=RunConfig(seeds=2, timing=False), jobs=grid.jobs,
                            only=wanted)  # fmt: skip
    assert [r.key for r in report.results] == [grid.keys[-1]] and report.results[0].seed == 1
    two = plan_grid([qkv, replace(qkv, layer=3)], ["exact"], [], RunConfig(timing=False))
    with pytest.raises(UsageError, match="planned for several"):
        kdecli.compare(qkv, jobs=two.jobs)


def test_causal_queries_over_a_longer_key_set_sit_at_the_end_by_default(qkv):
    """n_q = 59 < n_k = 97 under --causal: Causal(38), the queries the last positions; exact
    attention is exact, the mean baseline is its floor, the header says the offset."""
    report = kdecli.compare(qkv, ["exact", "mean"], [], causal=True, timing=False)
    assert report.input.causal and report.input.query_offset == 97 - 59
    assert [r.status for r in report.results] == ["ok", "ok"]
    assert report.results[0].error("rel_spectral") < 1e-6
    doc = json.loads(to_json(report))
    assert doc["input"]["query_offset"] == 38
    assert (
        kdecli.compare(qkv, ["mean"], [], timing=False).as_dict()["input"].get("query_offset")
        is None
    )  # written only when there is one
    at_start = kdecli.compare(qkv, ["mean"], [], causal=True, query_offset=0, timing=False)
    assert (
        at_start.input.query_offset == 0
        and "query_offset" not in json.loads(to_json(at_start))["input"]
    )
    assert at_start.floors.mean != report.floors.mean  # the mean of another prefix


def test_a_bad_query_offset_names_the_allowed_range(qkv):
    with pytest.raises(UsageError, match=r"--query-offset must be in 0\.\.38 .* got 39"):
        kdecli.compare(qkv, ["exact"], [], causal=True, query_offset=39)
    with pytest.raises(UsageError, match="integer >= 0"):
        kdecli.compare(qkv, ["exact"], [], causal=True, query_offset=-1)
    with pytest.raises(UsageError, match="add --causal"):
        kdecli.compare(qkv, ["exact"], [], query_offset=3)
    res = CliRunner().invoke(
        app, ["compare", "synthetic:n=97,nq=59,d=8", "--methods", "exact", "--causal",
              "--query-offset", "50"],
    )  # fmt: skip
    assert res.exit_code == 2 and "--query-offset must be in 0..38" in res.stderr
