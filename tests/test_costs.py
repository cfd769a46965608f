"""Costs that compare: keys per query, FLOPs over exact attention's, and --budget-mode keys."""

import json
import math

import pytest
from typer.testing import CliRunner

import kdecli
from kdecli.cli import app
from kdecli.experiments.compare.records import RunReport
from kdecli.masks import FULL, Causal
from kdecli.methods import get_method_class, method_names

BUDGETED = [name for name in method_names() if get_method_class(name).uses_budget]


@pytest.mark.parametrize("name", BUDGETED)
def test_keys_mode_pays_the_budget_per_query(name):
    method = get_method_class(name)(64, budget_mode="keys")
    assert method.keys_per_query(4096, 4096) == pytest.approx(64, abs=1)
    assert method.budget_mode == "keys"


@pytest.mark.parametrize("name", method_names())
def test_every_method_says_what_a_query_pays(name):
    cls = get_method_class(name)
    method = cls(64 if cls.uses_budget else None)
    for mask in (FULL, Causal(0)) if cls.supports_causal else (FULL,):
        paid = method.paid_keys(1024, 1024, mask)
        assert math.isfinite(paid) and 0 <= paid <= 1024 * 64, (name, mask, paid)


def test_the_paper_mapping_is_not_the_keys_mapping():
    kde = get_method_class("kdeformer")
    assert kde(64).keys_per_query(4096, 4096) == 96  # block m/2 + samples m = 1.5m
    assert get_method_class("reformer")(64).keys_per_query(4096, 4096) == 8 * 64
    assert get_method_class("exact")().keys_per_query(4096, 4096, mask=Causal(0)) == 2048.5


def test_records_carry_keys_and_flops_fraction():
    qkv = kdecli.load_input("synthetic:n=97,d=21")
    for causal in (False, True):
        report = kdecli.compare(
            qkv, ["exact", "uniform"], [16], causal=causal, timing=False, budget_mode="keys"
        )
        exact, uniform = report.results
        assert exact.flops_fraction == pytest.approx(1.0)
        assert 0 < uniform.flops_fraction < 1 and uniform.budget_mode == "keys"
        assert exact.keys_per_query == (97 if not causal else 49)
        assert uniform.keys_per_query == pytest.approx(16 if not causal else 16 * 98 / 194)
        assert report.as_dict()["results"][1]["budget_mode"] == "keys"


def test_unknown_budget_mode_is_a_usage_error():
    qkv = kdecli.load_input("synthetic:n=47,d=8")
    with pytest.raises(kdecli.errors.UsageError, match="--budget-mode"):
        kdecli.compare(qkv, ["uniform"], [8], budget_mode="flops")


def test_cli_budget_mode_and_min_time_reach_the_json():
    res = CliRunner().invoke(
        app,
        ["compare", "synthetic:n=256,d=16", "--methods", "exact,kdeformer", "--budgets", "32",
         "--seeds", "1", "--budget-mode", "keys", "--min-time", "0.05", "--format", "json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    exact, kde = doc["results"]
    assert kde["budget_mode"] == "keys" and kde["keys_per_query"] == 32
    assert kde["params"]["block_size"] + kde["params"]["samples"] == 32
    assert exact["flops_fraction"] == pytest.approx(1.0) and 0 < kde["flops_fraction"] < 1
    stat = kde["time"]["method_s"]
    assert stat["min_time"] == 0.05 and stat["repeats"] >= 3
    # (that the samples reach min_time is tested with a fake clock in tests/test_timing.py: a
    # product of wall-clock figures here would depend on the machine's load)
    csv = CliRunner().invoke(
        app, ["compare", "synthetic:n=64,d=8", "--methods", "uniform", "--budgets", "8",
              "--min-time", "0", "--format", "csv"],
    )  # fmt: skip
    header = csv.stdout.splitlines()[0].split(",")
    assert {"keys_per_query", "flops_fraction", "budget_mode"} <= set(header)


def test_methods_command_shows_both_mappings():
    res = CliRunner().invoke(app, ["methods", "kdeformer", "--budget", "60", "--format", "json"])
    entry = json.loads(res.stdout)
    assert entry["params_at_budget"]["block_size"] == 30
    assert entry["params_at_keys"]["block_size"] + entry["params_at_keys"]["samples"] == 60
    text = CliRunner().invoke(app, ["methods", "kdeformer", "--budget", "60"]).stdout
    assert "--budget-mode keys" in text and "--budget-mode paper" in text


def test_documents_without_the_new_fields_still_load():
    qkv = kdecli.load_input("synthetic:n=47,d=8")
    doc = kdecli.compare(qkv, ["uniform"], [8], repeats=1).as_dict()
    for record in doc["results"]:
        for key in ("keys_per_query", "flops_fraction", "budget_mode"):
            record.pop(key)
        for stat in (record["time"]["method_s"], record["time"]["exact_s"]):
            for key in ("calls_per_sample", "memory_source", "extrapolated", "extrapolated_rows",
                        "min_time"):  # fmt: skip
                stat.pop(key)
    back = RunReport.from_dict(json.loads(json.dumps(doc)))
    record = back.results[0]
    assert record.budget_mode == "paper" and record.keys_per_query is None
    assert not record.time.exact_s.extrapolated and record.time.method_s.calls_per_sample == 1
