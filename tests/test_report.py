"""`kdecli report` and the table: re-rendering saved results, widths, columns, floor markers."""

import io
import json

import pytest
from typer.testing import CliRunner

import kdecli
from kdecli.cli import app
from kdecli.experiments.compare.aggregate import aggregate
from kdecli.experiments.compare.records import load_document
from kdecli.experiments.compare.report import ALWAYS, COLUMN_KEYS, choose_columns, render

runner = CliRunner()
SPEC = "synthetic:n=128,d=16,b=1,h=2,kind=clustered"
METHODS = "exact,mean,kdeformer,performer,reformer,scatterbrain,topk"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One compare run saved as JSON, with the table it printed beside it."""
    folder = tmp_path_factory.mktemp("report")
    path = folder / "run.json"
    common = [SPEC, "--methods", METHODS, "--budgets", "8,32", "--seeds", "2", "--repeats", "1"]
    res = invoke("compare", *common, "--format", "json", "-o", path)
    assert res.exit_code == 0, res.stderr
    return path


def table_of(report, width, columns=None):
    buffer = io.StringIO()
    render(report, "table", buffer, width=width, columns=columns)
    return buffer.getvalue()


def test_report_prints_the_table_compare_printed(tmp_path):
    args = [
        SPEC,
        "--methods",
        "exact,mean,uniform",
        "--budgets",
        "8,16",
        "--seeds",
        "2",
        "--no-timing",
    ]
    printed = invoke("compare", *args, "--target-error", "0.9")
    saved = tmp_path / "run.jsonl"
    assert invoke("compare", *args, "--format", "jsonl", "-o", saved).exit_code == 0
    again = invoke("report", saved, "--target-error", "0.9")
    assert again.exit_code == 0, again.stderr
    assert again.stdout == printed.stdout and "cheapest setting" in again.stdout


def test_report_json_round_trips_to_the_same_records(saved, tmp_path):
    normalised = tmp_path / "normalised.json"
    res = invoke("report", saved, "--format", "json", "-o", normalised)
    assert res.exit_code == 0, res.stderr
    first, second = load_document(saved), load_document(normalised)
    assert first.results == second.results and first.to_dict() == second.to_dict()
    res = invoke("report", normalised, "--format", "jsonl")
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert lines[0]["type"] == "run" and len(lines) == 1 + len(first.results)


def test_markdown_and_csv(saved):
    res = invoke("report", saved, "--format", "markdown")
    assert res.exit_code == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ")]
    header = rows[0]
    assert "rel_spectral mean ± std" in header and "rel_spectral max" in header
    assert len(rows) == 1 + 2 + 2 * 5  # header, exact and mean, five methods at two budgets
    assert "floors: mean-of-V baseline" in res.stdout
    res = invoke("report", saved, saved, "--format", "csv")
    lines = res.stdout.splitlines()
    assert lines[0].startswith("method,budget,seed") and lines.count(lines[0]) == 1
    records = len(load_document(saved).results)
    assert len(lines) == 1 + 2 * records


def test_report_refusals(saved, tmp_path):
    res = invoke("report", saved, saved, "--format", "json")
    assert res.exit_code == 2 and "writes one document; got 2" in res.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 2}')
    res = invoke("report", bad)
    assert res.exit_code == 2 and f"{bad}: is not a kdecli result document" in res.stderr
    res = invoke("report", saved, "--format", "yaml")
    assert res.exit_code == 2 and "--format must be one of table, markdown" in res.stderr
    res = invoke("report", saved, "--columns", "method,speed")
    assert res.exit_code == 2 and "unknown column 'speed'" in res.stderr


@pytest.mark.parametrize("width", [80, 100, 200])
def test_the_table_fits_and_cuts_no_name_or_number(saved, width):
    report = load_document(saved)
    text = table_of(report, width)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    settings = aggregate(report.results, report.floors.mean_floor())
    columns, left_out = choose_columns(settings, width)
    assert set(ALWAYS) - {"layer", "phase"} <= {c.key for c in columns}  # no layer, phase columns
    # every row's first line holds each cell whole (only the status sentence may wrap)
    rows = [line.strip("│").split("│") for line in text.splitlines() if line.startswith("│")]
    rows = [row for row in rows if row[0].strip()]
    assert len(rows) == len(settings)
    for row, setting in zip(rows, settings):
        for cell, column in zip(row, columns):
            if column.key != "status":
                assert cell.strip() == column.cell(setting), (column.key, cell)
    if left_out:
        assert f"Not shown at width {width}: {', '.join(left_out)}" in " ".join(text.split())
    else:
        assert "Not shown" not in text


def test_narrow_tables_drop_columns_wide_ones_show_them(saved):
    report = load_document(saved)
    narrow, wide = table_of(report, 80), table_of(report, 200)
    assert "rel_frobenius" not in narrow.split("Not shown")[0] and "rel_frobenius" in wide
    assert "Not shown at width 80" in narrow and "Not shown" not in wide


def test_columns_option_chooses(saved):
    report = load_document(saved)
    text = table_of(report, 80, ("method", "budget", "rel_frobenius", "flops"))
    header = text.split("┡")[0]
    assert "rel_frobenius" in header and "FLOPs" in header and "speed-up" not in header
    every = table_of(report, 80, COLUMN_KEYS)  # wider than 80: drawn whole, never cut
    assert "…" not in every and "max_row_rel" in every and "Not shown" not in every


def test_beats_mean_floor_says_which_side_of_the_floor_a_method_is(tmp_path):
    """uniform with 1 key per query is far above the mean-of-V floor; topk with every key is
    exact, far below it.  The JSON flag and the table marker must say so, and not the reverse."""
    qkv = kdecli.load_input("synthetic:n=64,d=8,b=1,h=2")
    report = kdecli.compare(qkv, ["mean", "uniform", "topk"], [1, 64], seeds=2, timing=False)
    floor = report.floors.mean_floor()
    by = {(r.method, r.budget): r for r in report.results}
    assert by["uniform", 1].error("rel_spectral") > 2 * floor
    assert by["topk", 64].error("rel_spectral") < 1e-6 < floor
    assert by["uniform", 1].beats_mean_floor is False
    assert by["topk", 64].beats_mean_floor is True
    assert by["mean", None].beats_mean_floor is None  # the floor itself
    rows = {
        line.split("│")[1].strip() + " " + line.split("│")[2].strip(): line
        for line in table_of(report, 200).splitlines()
        if line.startswith("│")
    }
    assert "not below mean floor" in rows["uniform 1"]
    assert "not below mean floor" not in rows["topk (oracle) 64"]
    assert "not below mean floor" not in rows["mean —"]
