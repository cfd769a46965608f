"""One loader for every document kdecli writes: compare (JSON, JSONL, merged), scale and drift are
each read back as their own typed report, write the same bytes again, and anything else is refused
with a message that names the file."""

import io
import json

import pytest

import kdecli
from kdecli.experiments.compare.records import to_json
from kdecli.experiments.compare.report import render
from kdecli.experiments.documents import kind_of, load_any
from kdecli.experiments.drift.records import (
    DriftReport,
    DriftResult,
    ExactRun,
    ModelInfo,
    drift_json,
)
from kdecli.experiments.scale.records import Fit, ScaleReport
from kdecli.measure.figures import SeedStats, TimeStat
from kdecli.records import SchemaError
from kdecli.sweeps.merge import merge_reports

SPEC = "synthetic:n=32,d=8,b=1,h=2"
METHODS = ["exact", "uniform"]


@pytest.fixture(scope="module")
def run():
    """A small compare run that carries its grid, so it can also be merged."""
    qkv = kdecli.load_input(SPEC)
    report = kdecli.compare(qkv, METHODS, [8], seeds=2, repeats=1, warmup=0, device="cpu")
    report.grid = kdecli.plan_grid([qkv], METHODS, [8], seeds=2).info()
    return report


def scale_of(run) -> ScaleReport:
    fits = {"uniform": Fit(1.0, 2, 32, 64), "exact": Fit(None, 1, 32, 32, "one length")}
    return ScaleReport(SPEC, 8, [32, 64], runs=[run, run], fits=fits, environment=run.environment)


def drift_of(run) -> DriftReport:
    stat = SeedStats.of([0.25, 0.5])
    result = DriftResult(
        "uniform", 4, {"samples": 4}, "approximation", (0, 1), hidden=(stat, stat), kl=stat
    )
    floor = DriftResult("mean", None, {}, "baseline", (None,), hidden=(stat, stat), kl=stat)
    return DriftReport(
        environment=run.environment,
        model=ModelInfo("llama", "llama", 2, "next-token"),
        text="topics.txt",
        text_sha256="ab" * 32,
        tokens=24,
        chunks=2,
        layers=[0, 1],
        exact=ExactRun(12.5, TimeStat(0.01, 0.001, 3)),
        floor=floor,
        results=[result],
    )


def written(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text + "\n")
    return path


def jsonl_of(report) -> str:
    buffer = io.StringIO()
    render(report, "jsonl", buffer)
    return buffer.getvalue().rstrip("\n")


def test_every_kind_loads_as_its_report_and_writes_the_same_bytes(run, tmp_path):
    merged = merge_reports([run], ["run.json"]).report
    documents = {
        "compare.json": (to_json(run), kdecli.RunReport, to_json),
        "compare.jsonl": (jsonl_of(run), kdecli.RunReport, jsonl_of),
        "merged.json": (to_json(merged), kdecli.RunReport, to_json),
        "scale.json": (
            json.dumps(scale_of(run).to_dict(), indent=2),
            ScaleReport,
            lambda r: json.dumps(r.to_dict(), indent=2),
        ),
        "drift.json": (drift_json(drift_of(run)), DriftReport, drift_json),
    }
    for name, (text, kind, write) in documents.items():
        loaded = load_any(written(tmp_path, name, text))
        assert type(loaded) is kind, name
        assert write(loaded) == text, name
    assert load_any(tmp_path / "merged.json").merge is not None
    header = written(tmp_path, "started.jsonl", jsonl_of(run).splitlines()[0])
    assert load_any(header).results == []  # a stream stopped before its first record
    assert kdecli.load_any is load_any


def test_the_kind_comes_from_what_a_document_already_holds(run):
    assert kind_of(run.to_dict()) == "compare"
    assert kind_of(scale_of(run).to_dict()) == "scale"
    assert kind_of(drift_of(run).to_dict()) == "drift"
    assert kind_of({"report": "inspect"}) is None and kind_of([1]) is None


@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"report": "inspect", "input": {}}', "is a `kdecli inspect` report"),
        ('{"document": "decode", "schema_version": 1}', "of kind 'decode'"),
        ("[1, 2]", "holds a JSON list"),
        ("method,budget,seed\nexact,,0\n", "is the CSV of `kdecli compare`"),
        ('{"document": "scale", "schema_version": 1, "input": "x"}', "`budget` is missing"),
        (
            '{"document": "scale", "schema_version": 1, "input": "x", "budget": 8, "lengths": [64], '
            '"fits": {}, "runs": [{"results": []}]}',
            "`runs[0]`: is not a kdecli result document",
        ),
        ('{"document": "drift", "schema_version": 9}', "drift schema_version 9"),
        ("{not json", "is not JSON"),
    ],
)
def test_what_is_no_document_is_refused_naming_the_file(tmp_path, text, problem):
    path = written(tmp_path, "odd.json", text)
    with pytest.raises(SchemaError) as info:
        load_any(path)
    assert info.value.message.startswith(f"{path}:") and problem in info.value.message


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(SchemaError, match="no such file"):
        load_any(tmp_path / "none.json")
