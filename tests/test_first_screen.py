"""The first screen answers the question (issue 28): a verdict under every table and in the JSON,
a main table of one row per line at 80 columns, outputs named by their format, floors beside
scale's errors, budget plots that show the keys a method really reads, and one way of naming a
document's kind and schema (documents written before it still load).

The fixtures in tests/fixtures/documents_0_7 were written by kdecli 0.7.0, before any of this.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from kdecli.cli import app
from kdecli.experiments.compare.report import render_text, table_rows
from kdecli.experiments.documents import kind_of, load_any
from kdecli.experiments.scale.report import rows as scale_rows
from kdecli.experiments.verdict import (
    Point,
    Verdict,
    compare_verdict,
    crossing,
    drift_verdict,
    judge,
    power_law,
    scale_verdict,
)
from kdecli.experiments.views import render_document
from kdecli.render.cells import fmt_speedup

ROOT = Path(__file__).resolve().parents[1]
OLD = ROOT / "tests" / "fixtures" / "documents_0_7"
SYN = "synthetic:n=64,d=8,b=1,h=2,seed=0"
FAST = ("--seeds", "1", "--repeats", "1", "--warmup", "0", "--min-time", "0", "--device", "cpu")
runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def point(method, budget, error, floor=0.5, role="approximation", **kw) -> Point:
    return Point(method, role, budget, error, floor, budget=budget, **kw)


# ---- the verdict, on points made here ----------------------------------------------------------


def test_the_best_method_below_the_floor_at_each_budget():
    points = [
        point("exact", None, 0.0, role="reference", speedup=1.0),
        point("mean", None, 0.5, role="baseline", speedup=300.0),
        point("a", 64, 0.6), point("b", 64, 0.4), point("c", 64, 0.3),
        point("a", 128, 0.2), point("b", 128, 0.3), point("c", 128, 0.7),
        point("a", 256, 0.55), point("b", 256, 0.51),
    ]  # fmt: skip
    verdict = judge(points, "rel_spectral")
    best = {b.at: b.method for b in verdict.below_floor}
    assert best == {64: "c", 128: "a", 256: None}  # 256: nobody below 0.5
    assert not verdict.all_at_or_above_floor
    first = verdict.sentences[0]
    assert "64 c (0.3)" in first and "128 a (0.2)" in first and "256 none" in first
    assert "exact (" not in first and "mean (" not in first  # the reference, the floor: no rivals
    assert "First below it: a at 128, b at 64, c at 64." in first


def test_every_method_at_or_above_the_floor_is_said_so():
    verdict = judge([point("a", 64, 0.5), point("b", 64, 0.9)], "rel_spectral")
    assert verdict.all_at_or_above_floor
    assert verdict.sentences[0].startswith("Every method is at or above the mean-of-V floor")


def test_the_cheapest_setting_faster_than_exact_or_that_none_is():
    points = [
        point("a", 64, 0.3, speedup=3.0, flops=10.0, n=2048, device="cpu"),
        point("b", 64, 0.2, speedup=1.5, flops=5.0, n=2048, device="cpu"),
        point("c", 64, 0.9, speedup=9.0, flops=1.0, n=2048, device="cpu"),  # above the floor
        point("d", 64, 0.1, speedup=0.5, flops=0.5, n=2048, device="cpu"),  # slower
    ]
    fast = judge(points, "rel_spectral").faster[0]
    assert (fast.method, fast.budget, fast.speedup) == ("b", 64, 1.5)
    slow = [point("d", 64, 0.1, speedup=0.034, n=2048, device="cpu")]
    verdict = judge(slow, "rel_spectral")
    assert verdict.faster[0].method is None and verdict.faster[0].n == 2048
    assert "No setting below the floor is faster than exact at n = 2,048 on cpu" in verdict.text()


def test_keys_per_query_above_the_budget_is_a_warning():
    points = [
        point("reformer", 64, 0.1, keys_per_query=512.0),
        point("reformer", 128, 0.05, keys_per_query=1024.0),
        point("performer", 64, 0.3, keys_per_query=64.0),
        point("kdeformer", 64, 0.4, keys_per_query=96.0),
    ]
    verdict = judge(points, "rel_spectral")
    assert [(o.method, o.budget, o.keys_per_query) for o in verdict.over_budget] == [
        ("reformer", 64, 512.0),
        ("kdeformer", 64, 96.0),
    ]
    warning = verdict.sentences[-1]
    assert "reformer reads 512 at budget 64 (8.0×)" in warning and "performer" not in warning
    assert "reformer* (0.1)" in verdict.sentences[0]  # its win carries the mark


def test_phases_are_judged_apart():
    points = [
        point("a", 64, 0.1, phase="prefill"),
        point("b", 64, 0.3, phase="prefill"),
        point("a", 64, 0.6, phase="decode"),
        point("b", 64, 0.2, phase="decode"),
    ]
    verdict = judge(points, "rel_spectral")
    by_phase = {(b.phase, b.at): b.method for b in verdict.below_floor}
    assert by_phase == {("prefill", 64): "a", ("decode", 64): "b"}
    assert verdict.sentences[0].startswith("Prefill: ")
    assert any(s.startswith("Decode: ") for s in verdict.sentences)
    one = judge([point("a", 64, 0.1, phase="prefill")], "rel_spectral")
    assert not one.sentences[0].startswith("Prefill")  # one prefill phase: nothing to tell apart


def test_a_figure_where_higher_is_better_beats_its_floor_from_above():
    points = [
        point("a", 8, 0.99, floor=0.9, higher_is_better=True),  # cosine above the floor's
        point("b", 8, 0.999, floor=0.9, higher_is_better=True),
        point("c", 8, 0.8, floor=0.9, higher_is_better=True),
    ]
    verdict = judge(points, "cosine")
    assert verdict.below_floor[0].method == "b"
    assert judge(points[2:], "cosine").all_at_or_above_floor


def test_power_law_and_where_two_of_them_cross():
    ns = [1024, 4096, 16384]
    c, alpha = power_law([(n, 3e-9 * n**2) for n in ns])
    assert alpha == pytest.approx(2) and c == pytest.approx(3e-9)
    # exact 1e-9·n², method 1e-6·n: equal at n = 1000
    assert crossing((1e-6, 1.0), (1e-9, 2.0)) == pytest.approx(1000)
    assert crossing((1e-6, 2.0), (1e-9, 2.0)) is None  # grows as fast: never overtakes
    assert power_law([(64, 1.0)]) is None


def test_speedups_keep_two_significant_digits():
    assert fmt_speedup(0.034) == "0.034×" and fmt_speedup(0.5) == "0.5×"
    assert fmt_speedup(14.06) == "14.1×" and fmt_speedup(None) == "—"


# ---- the verdict on real documents --------------------------------------------------------------


def test_compare_verdict_agrees_with_the_records_of_a_0_7_document():
    report = load_any(OLD / "compare.json")
    verdict = compare_verdict(report)
    floor = report.floors.mean_floor("rel_spectral")
    by = {}
    for r in report.results:  # seed-means computed here from the records
        if r.ok and r.role == "approximation":
            by.setdefault((r.budget, r.method), []).append(r.error("rel_spectral"))
    for best in verdict.below_floor:
        means = {m: statistics.fmean(e) for (b, m), e in by.items() if b == best.at}
        below = {m: e for m, e in means.items() if e < floor}
        assert best.method == (min(below, key=below.get) if below else None)
        assert best.floor == pytest.approx(floor)
    keys = {(r.method, r.budget): r.keys_per_query for r in report.results if r.budget}
    flagged = {o.method for o in verdict.over_budget}
    assert flagged == {m for (m, b), k in keys.items() if k is not None and k > b}
    assert "reformer" in flagged  # 8 hashes × 2 chunks of budget/2 keys


def test_the_json_carries_the_verdict_as_its_summary():
    report = load_any(OLD / "compare.json")
    doc = json.loads(render_text(report, "json"))
    verdict = compare_verdict(report)
    assert doc["summary"] == verdict.to_dict()
    assert Verdict.from_dict(doc["summary"]).sentences == verdict.sentences
    assert load_any(OLD / "compare.json").results  # the summary is never read back
    again = ROOT / "tests" / "fixtures" / "documents_0_7" / "compare.json"
    assert "summary" not in json.loads(again.read_text())  # (the fixture is today's, untouched)
    scale = json.loads(render_document(OLD / "scale.json", "json"))
    assert scale["summary"]["sentences"] and scale["kind"] == "scale"
    drift = json.loads(render_document(OLD / "drift.json", "json"))
    assert drift["summary"]["metric"] == "KL" and drift["kind"] == "drift"


def test_every_table_is_followed_by_its_verdict():
    for name, verdict_of in (
        ("compare.json", compare_verdict),
        ("merged.json", compare_verdict),
        ("compare.jsonl", compare_verdict),
        ("scale.json", scale_verdict),
        ("drift.json", drift_verdict),
    ):
        sentences = verdict_of(load_any(OLD / name)).sentences
        assert sentences, name
        for fmt in ("table", "markdown"):
            text = " ".join(render_document(OLD / name, fmt, width=100).split())
            assert " ".join(sentences[0].split()) in text, (name, fmt)


def test_scale_shows_the_floor_beside_each_error_and_says_all_are_above_it():
    report = load_any(OLD / "scale.json")
    for row in scale_rows(report):
        run = report.runs[report.lengths.index(row.n)]
        assert row.floor == run.floors.mean_floor(row.metric)
    text = render_document(OLD / "scale.json", "table", width=100)
    assert "floor" in text.split("┡")[0]  # a column of the table
    above = all(r.error >= r.floor for r in scale_rows(report) if r.error is not None)
    assert above  # gaussian data at n ≤ 256: the mean of V is hard to beat
    assert scale_verdict(report).all_at_or_above_floor == above
    assert "Every method is at or above the mean-of-V floor" in " ".join(text.split())


# ---- 80 columns ---------------------------------------------------------------------------------


def test_at_80_columns_one_row_per_line_with_a_legend_and_no_parameters():
    report = load_any(OLD / "compare.json")
    text = render_text(report, "table", width=80, verbose=False)
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert len(rows) == len(table_rows(report))  # no status folds onto a second line
    assert all(len(line) <= 80 for line in text.splitlines() if line[:1] in "┏┃┡│└")
    assert "≥floor" in text and "status: ok ran · ≥floor ran, error not below" in text
    assert "resolved parameters" not in text
    exact = next(line for line in rows if line.split("│")[1].strip() == "exact")
    assert "×" not in exact  # exact against itself: a dash, not noise around 1×
    assert "0.0×" not in text
    assert "resolved parameters" in render_text(report, "table", width=80, verbose=True)
    wide = render_text(report, "table", width=200)
    assert "not below mean floor" in wide and "status:" not in wide  # room for the sentence


def test_the_readme_quick_start_at_80_columns(tmp_path):
    """The README's own command (made small: --n 512, one seed, one quick timing) in a subprocess."""
    readme = (ROOT / "README.md").read_text("utf-8")
    line = next(x for x in readme.splitlines() if "kdecli compare sample:glove" in x)
    command = shlex.split(line[line.index("kdecli compare") :].strip("`"))
    small = ["--n", "512", *FAST]  # every budget of the README (≤ 512) fits
    env = {**os.environ, "COLUMNS": "80", "KDECLI_DEBUG": ""}
    res = subprocess.run(
        [sys.executable, "-m", "kdecli", *command[1:], *small],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    methods = command[command.index("--methods") + 1].split(",")
    budgets = command[command.index("--budgets") + 1].split(",")
    budget_free = {"exact", "mean"}
    expected = sum(1 if m in budget_free else len(budgets) for m in methods)
    assert len([x for x in lines if x.startswith("│")]) == expected, res.stdout
    assert max(len(x) for x in lines) <= 80, res.stdout
    text = " ".join(res.stdout.split())
    assert re.search(r"Best below the mean-of-V floor|Every method is at or above", text)
    assert re.search(r"faster than exact", text)
    assert "resolved parameters" not in text


# ---- outputs named by their format ---------------------------------------------------------------


def test_output_format_comes_from_the_extension(tmp_path):
    for name, check in (
        ("r.json", lambda t: json.loads(t)["kind"] == "compare"),
        ("r.jsonl", lambda t: json.loads(t.splitlines()[0])["type"] == "run"),
        ("r.csv", lambda t: t.startswith("method,budget,")),
        ("r.txt", lambda t: "┏" in t),
        ("r.md", lambda t: t.startswith("**") and "| method |" in t),
    ):
        out = tmp_path / name
        res = invoke("compare", SYN, "--methods", "exact,uniform", "--budgets", 8, *FAST, "-o", out)
        assert res.exit_code == 0, res.stderr
        assert check(out.read_text("utf-8")), name
    md = tmp_path / "r.md"
    res = invoke("report", tmp_path / "r.json", "-o", md)
    assert res.exit_code == 0 and md.read_text("utf-8").startswith("**"), res.stderr


def test_a_format_that_contradicts_the_extension_is_a_usage_error(tmp_path):
    out = tmp_path / "out.json"
    res = invoke("compare", SYN, "--methods", "uniform", "--budgets", 8, *FAST, "-f", "csv",
                 "-o", out)  # fmt: skip
    assert res.exit_code == 2 and not out.exists()
    assert "names json by its extension; got --format csv" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 2  # the error and its hint, no traceback
    res = invoke("report", OLD / "compare.json", "-f", "table", "-o", tmp_path / "t.txt")
    assert res.exit_code == 0, res.stderr  # .txt is a table


def test_capture_output_must_be_hdf5(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    res = invoke("capture", tmp_path / "no-model", "--text", text, "-o", tmp_path / "bad.txt")
    assert res.exit_code == 2 and "a capture is an HDF5 file" in res.stderr
    assert not (tmp_path / "bad.txt").exists()


def test_an_existing_file_that_is_not_hdf5_is_named_so(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("not hdf5")
    fake = tmp_path / "fake.h5"
    fake.write_text("not hdf5 either")
    for spec, message in (
        (f"{bad}:/layer0", f"{bad}: is not an HDF5 file"),
        (f"{fake}:/layer0", f"{fake}: is not an HDF5 file"),
        (str(fake), f"{fake}: is not an HDF5 file"),
    ):
        for command in ("inspect", "compare"):
            res = invoke(command, spec)
            assert res.exit_code == 2 and message in res.stderr, (command, spec, res.stderr)
            assert "no such file" not in res.stderr
    named = tmp_path / "capture.txt"
    with h5py.File(named, "w") as f:
        f["layer0/q"] = np.zeros((4, 2))
    res = invoke("inspect", f"{named}:/layer0")
    assert res.exit_code == 2 and "is an HDF5 file; name it with .h5" in res.stderr
    res = invoke("inspect", tmp_path / "missing.h5")
    assert res.exit_code == 2 and "no such file" in res.stderr


# ---- plots: the keys a method reads --------------------------------------------------------------


def test_budget_plots_mark_the_keys_a_method_really_reads():
    pytest.importorskip("matplotlib")
    from kdecli.experiments.compare.plot import figure

    report = load_any(OLD / "compare.json")
    (ax,) = figure([report], x="budget").axes
    marks = {t.get_text() for t in ax.texts}
    expected = {
        f"▲ {r.keys_per_query:g} keys"
        for r in report.results
        if r.ok and r.budget and r.keys_per_query and r.keys_per_query > r.budget
    }
    assert expected and marks == expected  # reformer at budget 16 reads 128
    assert all(t.get_text() != f"▲ {r.budget} keys" for t in ax.texts for r in report.results)


# ---- one way of naming a document's kind and schema ----------------------------------------------


def test_every_document_names_its_kind_and_schema_the_same_way(tmp_path):
    out = tmp_path / "c.json"
    res = invoke("compare", SYN, "--methods", "exact,uniform", "--budgets", 8, *FAST, "-o", out)
    assert res.exit_code == 0, res.stderr
    res = invoke("inspect", SYN, "-o", tmp_path / "i.json")
    assert res.exit_code == 0, res.stderr
    jsonl = tmp_path / "c.jsonl"
    res = invoke("compare", SYN, "--methods", "uniform", "--budgets", 8, *FAST, "-o", jsonl)
    assert res.exit_code == 0, res.stderr
    docs = {
        "compare": json.loads(out.read_text()),
        "inspect": json.loads((tmp_path / "i.json").read_text()),
        "scale": json.loads(render_document(OLD / "scale.json", "json")),
        "drift": json.loads(render_document(OLD / "drift.json", "json")),
        "merged": json.loads(render_document(OLD / "merged.json", "json")),
    }
    for name, doc in docs.items():
        assert list(doc)[:2] == ["kind", "schema_version"], name
        assert isinstance(doc["schema_version"], int)
        assert "document" not in doc and "report" not in doc, name
    assert {name: doc["kind"] for name, doc in docs.items()} == {
        "compare": "compare", "inspect": "inspect", "scale": "scale", "drift": "drift",
        "merged": "compare",
    }  # fmt: skip
    header = json.loads(jsonl.read_text().splitlines()[0])
    assert header["type"] == "run" and header["kind"] == "compare"
    assert kind_of(docs["compare"]) == "compare" and kind_of(docs["inspect"]) is None


def test_documents_of_0_7_still_load_and_are_refused_by_kind(tmp_path):
    expected = {
        "compare.json": "RunReport", "compare.jsonl": "RunReport", "merged.json": "RunReport",
        "scale.json": "ScaleReport", "drift.json": "DriftReport",
    }  # fmt: skip
    for name, kind in expected.items():
        report = load_any(OLD / name)
        assert type(report).__name__ == kind, name
        res = invoke("report", OLD / name, "-f", "json")
        assert res.exit_code == 0, (name, res.stderr)
    assert json.loads((OLD / "scale.json").read_text())["document"] == "scale"  # the old name
    res = invoke("report", OLD / "inspect.json")
    assert res.exit_code == 2 and "is a `kdecli inspect` report" in res.stderr
    renamed = tmp_path / "i.json"
    doc = json.loads((OLD / "inspect.json").read_text())
    renamed.write_text(
        json.dumps({"kind": "inspect", **{k: v for k, v in doc.items() if k != "report"}})
    )
    res = invoke("report", renamed)
    assert res.exit_code == 2 and "is a `kdecli inspect` report" in res.stderr
    scale_as_compare = tmp_path / "s.json"
    scale_as_compare.write_text((OLD / "scale.json").read_text())
    from kdecli.experiments.compare.records import load_document

    with pytest.raises(Exception, match="is a `kdecli scale` document"):
        load_document(scale_as_compare)
