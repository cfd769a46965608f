import json

import pytest
import torch

import kdecli
from kdecli.errors import ParameterError, UsageError
from kdecli.experiments.compare.records import SCHEMA_VERSION
from kdecli.experiments.compare.report import render, to_csv, to_json
from kdecli.experiments.compare.run import derive_seed
from kdecli.methods import registry
from kdecli.methods.base import AttentionMethod


class Broken(AttentionMethod):
    name = "broken"
    summary = paper = "test only"
    randomized = True

    def forward(self, q, k, v, scale, generator, causal):
        raise RuntimeError("kaboom\nsecond line")


class NaNs(AttentionMethod):
    name = "nans"
    summary = paper = "test only"

    def forward(self, q, k, v, scale, generator, causal):
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
