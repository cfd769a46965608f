"""The result schema: typed records, round trips through JSON and JSONL, old versions, refusals."""

import copy
import io
import json

import pytest

import kdecli
from kdecli.errors import UsageError
from kdecli.experiments.compare.records import SCHEMA_VERSION, RunReport, load_document
from kdecli.experiments.compare.report import render

SPEC = "synthetic:n=64,d=8,b=1,h=2,kind=clustered"


@pytest.fixture(scope="module")
def report():
    qkv = kdecli.load_input(SPEC)
    return kdecli.compare(
        qkv,
        ["exact", "mean", "kdeformer", "topk"],
        [8, 16],
        seeds=2,
        repeats=1,
        warmup=0,
        device="cpu",
    )


def write(tmp_path, report, fmt):
    path = tmp_path / f"run.{fmt}"
    buffer = io.StringIO()
    render(report, fmt, buffer)
    path.write_text(buffer.getvalue())
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_documents_round_trip_to_the_same_records(report, tmp_path, fmt):
    loaded = load_document(write(tmp_path, report, fmt))
    assert loaded.results == report.results
    assert (loaded.environment, loaded.input, loaded.floors) == (
        report.environment,
        report.input,
        report.floors,
    )
    assert loaded.to_dict() == report.to_dict()


def test_every_result_keeps_its_environment_and_role(report):
    doc = report.to_dict()
    assert doc["schema_version"] == SCHEMA_VERSION == 2
    roles = {r["method"]: r["role"] for r in doc["results"]}
    assert roles == {
        "exact": "reference",
        "mean": "baseline",
        "kdeformer": "approximation",
        "topk": "oracle",
    }
    assert all(r["environment"] == doc["environment"] for r in doc["results"])
    assert [r["oracle"] for r in doc["results"]].count(True) == 2  # topk at two budgets


def version_one(doc):
    """What kdecli 0.1 wrote: no per-result environment, no roles."""
    old = copy.deepcopy(doc)
    old["schema_version"] = 1
    for record in old["results"]:
        del record["environment"], record["role"]
    return old


def test_version_one_documents_still_load(report, tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps(version_one(report.to_dict())))
    loaded = load_document(path)
    assert [r.role for r in loaded.results] == [r.role for r in report.results]
    assert all(r.environment == report.environment for r in loaded.results)
    assert [r.errors for r in loaded.results] == [r.errors for r in report.results]


@pytest.mark.parametrize(
    "edit, field, problem",
    [
        (lambda d: d["results"][1].update(status="fine"), "results[1].status", "must be one of"),
        (lambda d: d["results"][0].pop("method"), "results[0].method", "is missing"),
        (lambda d: d["results"][2].update(budget="8"), "results[2].budget", "must be an integer"),
        (lambda d: d["input"]["shape"].pop("n_k"), "input.shape.n_k", "is missing"),
        (lambda d: d["input"].update(scale="big"), "input.scale", "must be a number"),
        (
            lambda d: d["results"][3]["errors"].update(rel_spectral=[1]),
            "results[3].errors.rel_spectral",
            "must be an object",
        ),
        (lambda d: d.update(schema_version=7), "schema_version 7", "reads 1, 2"),
    ],
)
def test_a_bad_document_names_the_file_and_the_field(report, tmp_path, edit, field, problem):
    doc = report.to_dict()
    edit(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(UsageError) as info:
        load_document(path)
    message = info.value.message
    assert message.startswith(f"{path}:") and field in message and problem in message, message


def test_from_dict_refuses_what_is_not_a_document():
    with pytest.raises(UsageError, match="holds a JSON list"):
        RunReport.from_dict([1, 2], "x.json")
    with pytest.raises(UsageError, match="lacks schema_version, input"):
        RunReport.from_dict({"results": []}, "x.json")


def test_an_interrupted_document_says_so_everywhere(report, tmp_path):
    stopped = RunReport.from_dict(report.to_dict())
    stopped.results, stopped.interrupted = stopped.results[:3], True
    loaded = load_document(write(tmp_path, stopped, "json"))
    assert loaded.interrupted and len(loaded.results) == 3
    assert (
        "The run was interrupted: 3 records finished."
        in write(tmp_path, loaded, "table").read_text()
    )
    assert "interrupted" not in report.to_dict()  # a finished run's document is unchanged
