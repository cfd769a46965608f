"""The decode phase of ``compare`` and ``approx``: the last M queries, each over its own prefix.

A decode measurement is Q's last M rows, K and V whole, under ``Causal(n_k − M)``, against the
float64 reference of exactly those rows; ``--phase both`` measures prefill and decode side by side.
"""

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import kdecli
from kdecli.cli import app
from kdecli.errors import UsageError
from kdecli.experiments.compare.plan import plan_grid
from kdecli.experiments.compare.plot import collect_series, figure
from kdecli.experiments.compare.records import load_document, parse_document
from kdecli.experiments.compare.report import render_text, table_rows
from kdecli.masks import Causal
from kdecli.measure.config import RunConfig
from kdecli.measure.reference import exact_attention
from kdecli.measure.setting import Setting
from kdecli.methods import make_method
from kdecli.sweeps.grid import digest

runner = CliRunner()
SYN = "synthetic:n=96,d=8,b=1,h=2"
FAST = ("--repeats", 1, "--warmup", 0, "--min-time", 0)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def causal_input(n=96, seed=0):
    torch.manual_seed(seed)
    q, k, v = (torch.randn(2, 2, n, 8, dtype=torch.float64) for _ in range(3))
    return kdecli.QKV(q, k, v, "test", default_causal=True)


# ---- the measurement ----------------------------------------------------------------------------


def test_decode_rows_are_the_matching_rows_of_a_full_prefill():
    """Q's last M rows under Causal(n_k − M) give the last M rows of the causal prefill, for the
    float64 reference and for the method `exact`; another offset would not."""
    qkv, m = causal_input(), 5
    prefill = exact_attention(qkv.q, qkv.k, qkv.v, 0.3, mask=Causal(0))
    rows = qkv.last_queries(m)
    setting = Setting.of(qkv, RunConfig(phase="decode", queries=m))
    assert setting.mask == Causal(96 - m) and rows.q.shape[-2] == m
    decode = exact_attention(rows.q, rows.k, rows.v, 0.3, mask=setting.mask)
    torch.testing.assert_close(decode, prefill[..., -m:, :], rtol=0, atol=1e-12)
    exact = make_method("exact", None)(rows.q, rows.k, rows.v, scale=0.3, mask=setting.mask)
    torch.testing.assert_close(exact, prefill[..., -m:, :], rtol=1e-10, atol=1e-10)
    shifted = exact_attention(rows.q, rows.k, rows.v, 0.3, mask=Causal(96 - m - 1))
    assert not torch.allclose(shifted, prefill[..., -m:, :], atol=1e-6)


def test_compare_decode_measures_the_rows_against_their_own_reference():
    """`exact` is exact on the decode rows; the header names the phase and the rows measured."""
    report = kdecli.compare(causal_input(), ["exact"], [], phase="decode", queries=3, timing=False)
    (record,) = report.results
    assert record.phase == "decode" and record.errors["rel_spectral"].mean < 1e-10
    assert (report.input.phase, report.input.queries, report.input.shape.n_q) == ("decode", 3, 3)
    assert report.input.query_offset == 93 and report.input.note is None  # the input is causal


def test_the_mean_floor_of_decode_is_each_querys_prefix_mean():
    """Computed here on its own: row i of the last M sits at p = n − M + i and the baseline
    answers the mean of V[:p+1]; its rel_spectral per slice, averaged, is the decode floor."""
    qkv, m, scale = causal_input(n=64, seed=1), 6, 0.35
    report = kdecli.compare(qkv, ["mean"], [], phase="decode", queries=m, scale=scale, timing=False)
    q, k, v = qkv.q[..., -m:, :], qkv.k, qkv.v
    positions = torch.arange(64 - m, 64)
    logits = scale * q @ k.transpose(-1, -2)
    logits = logits.masked_fill(torch.arange(64) > positions[:, None], -torch.inf)
    exact = torch.softmax(logits, -1) @ v
    prefix_mean = torch.stack([v[..., : p + 1, :].mean(-2) for p in positions.tolist()], -2)
    err = torch.linalg.matrix_norm(prefix_mean - exact, ord=2)
    expected = (err / torch.linalg.matrix_norm(exact, ord=2)).mean().item()
    assert report.floors.mean_floor("rel_spectral") == pytest.approx(expected, rel=1e-9)
    assert report.results[0].errors["rel_spectral"].mean == pytest.approx(expected, rel=1e-9)
    whole_mean = v.mean(-2, keepdim=True).expand_as(exact)  # the full-attention floor differs
    wrong = torch.linalg.matrix_norm(whole_mean - exact, ord=2)
    assert (wrong / torch.linalg.matrix_norm(exact, ord=2)).mean().item() != pytest.approx(
        expected, rel=1e-3
    )


def test_phase_both_gives_a_record_per_phase_with_distinct_keys():
    qkv = kdecli.load_input(SYN)
    report = kdecli.compare(
        qkv, ["exact", "uniform"], [16, 32], phase="both", queries=4, seeds=1, timing=False
    )
    pairs = [(r.method, r.budget, r.phase) for r in report.results]
    assert pairs == [
        ("exact", None, "prefill"), ("uniform", 16, "prefill"), ("uniform", 32, "prefill"),
        ("exact", None, "decode"), ("uniform", 16, "decode"), ("uniform", 32, "decode"),
    ]  # fmt: skip
    assert len({r.key for r in report.results}) == 6
    parts = [(x.layer, x.input.phase, x.input.shape.n_q) for x in report.layers]
    assert parts == [(None, "prefill", 96), (None, "decode", 4)]
    # the input is not causal: decode puts the causal mask on and says so, prefill stays full
    assert not report.layers[0].input.causal and report.layers[1].input.causal
    assert "not causal" in report.layers[1].input.note
    assert report.floors_of(None, "decode") == report.layers[1].floors != report.floors


def test_prefill_keys_hash_what_they_hashed_before_phases():
    """A prefill key is the digest of the same fields as before (no phase, no queries), and a
    decode key differs from it and between query counts."""
    qkv = kdecli.load_input("synthetic:n=64,d=8,b=1,h=2")
    config = RunConfig(seeds=1, timing=False, device="cpu")
    (job,) = plan_grid([qkv], ["exact"], [], config).jobs
    s = job.setting
    old = {
        "input_digest": qkv.digest, "layer": None, "dtype": "float32", "device": "cpu",
        "scale": s.scale, "causal": False, "reference": "full", "budget_mode": "paper",
        "bound": False, "timing": False, "backward": False,
        "method": "exact", "budget": None, "params": job.resolved, "seed": None,
    }  # fmt: skip
    assert job.keys == (digest(old),)
    decode = plan_grid([qkv], ["exact"], [], config, phase="decode").keys
    decode4 = plan_grid([qkv], ["exact"], [], config, phase="decode", queries=4).keys
    assert len({job.keys[0], decode[0], decode4[0]}) == 3
    both = plan_grid([qkv], ["exact"], [], config, phase="both")
    assert both.keys == [job.keys[0], decode[0]]
    assert both.spec["inputs"][1]["phase"] == "decode" and "phase" not in both.spec["inputs"][0]


def test_bad_phase_and_queries_are_refused():
    with pytest.raises(UsageError, match="--phase must be one of prefill, decode, both"):
        RunConfig(phase="generate")
    with pytest.raises(UsageError, match="--queries must be an integer >= 1"):
        RunConfig(queries=0)
    with pytest.raises(UsageError, match="drop --no-causal"):
        RunConfig(phase="decode", causal=False)
    with pytest.raises(UsageError, match=r"--queries must be in 1\.\.96"):
        plan_grid([kdecli.load_input(SYN)], ["exact"], [], phase="decode", queries=97)


def test_auto_reference_is_full_for_decode_rows():
    qkv = kdecli.load_input(SYN)
    config = RunConfig(reference="rows:8", phase="decode", queries=16)
    assert Setting.of(qkv, config).reference == "rows:8@0"  # asked for: kept
    assert Setting.of(qkv, RunConfig(phase="decode", queries=16)).reference == "full"


# ---- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("queries", [0, 97])
def test_queries_out_of_range_is_a_one_line_usage_error(queries):
    res = invoke("compare", SYN, "--methods", "exact", "--phase", "decode", "--queries", queries)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) <= 2 and "--queries must be" in res.output  # the error and maybe a hint
    assert "Traceback" not in res.output


def test_approx_takes_the_phase_too(tmp_path):
    out = tmp_path / "a.json"
    res = invoke(
        "approx", SYN, "-m", "uniform", "-b", 16, "--phase", "decode", "--queries", 2,
        *FAST, "-f", "json", "-o", out, "-q",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["input"]["phase"] == "decode" and doc["input"]["queries"] == 2
    assert [r["phase"] for r in doc["results"]] == ["decode"]


def test_resume_of_a_decode_run_skips_the_finished_records(tmp_path):
    path = tmp_path / "run.jsonl"
    args = ("compare", SYN, "--methods", "exact,uniform", "--budgets", "16,32", "--seeds", 2,
            "--phase", "both", "--queries", 3, "--no-timing")  # fmt: skip
    assert invoke(*args, "--resume", path, "-q").exit_code == 0
    lines = path.read_text().splitlines()
    results = [json.loads(line) for line in lines if '"type": "result"' in line]
    assert len(results) == 10 and {r["phase"] for r in results} == {"prefill", "decode"}
    # a crash after the first decode record: the last four never reached the file
    path.write_text("\n".join(lines[:-4]) + "\n")
    res = invoke(*args, "--resume", path)
    assert res.exit_code == 0, res.output
    assert "6 of 10 records" in res.output and "4 to run" in res.output
    again = [json.loads(line) for line in path.read_text().splitlines()]
    assert len([r for r in again if r["type"] == "result"]) == 10
    doc = load_document(path)
    assert [r.phase for r in doc.results].count("decode") == 5
    assert sorted(x.input.phase for x in doc.layers) == ["decode", "prefill"]
    res = invoke(*args, "--resume", path)
    assert "Nothing left to run" in res.output


# ---- reports and plots --------------------------------------------------------------------------


def both_report():
    qkv = kdecli.load_input(SYN)
    return kdecli.compare(
        qkv, ["exact", "uniform", "mean"], [16], phase="both", queries=4, seeds=2, timing=False
    )


def floors_at(floors, value):
    """``floors`` with its mean-of-V rel_spectral set to ``value``."""
    mean = dict(floors.mean, rel_spectral=replace(floors.mean["rel_spectral"], mean=value))
    return replace(floors, mean=mean)


def test_the_report_separates_phases_and_reads_back(tmp_path):
    report = both_report()
    rows = table_rows(report)
    assert [(r.phase, r.method) for r in rows] == [
        ("prefill", "exact"), ("prefill", "uniform"), ("prefill", "mean"),
        ("decode", "exact"), ("decode", "uniform"), ("decode", "mean"),
    ]  # fmt: skip
    # each phase's row meets its own floor: one above every error, one below
    uniform = {r.phase: r for r in rows if r.method == "uniform"}
    for phase, row in uniform.items():
        floor = report.floors_of(None, phase).mean_floor()
        assert row.beats_mean_floor == (row.error("rel_spectral") < floor)
    prefill, decode = report.layers
    high, low = (floors_at(prefill.floors, value) for value in (100.0, 0.0))
    report.layers = [replace(prefill, floors=low), replace(decode, floors=high)]
    beats = {(r.phase, r.method): r.beats_mean_floor for r in table_rows(report)}
    assert beats[("prefill", "uniform")] is False and beats[("decode", "uniform")] is True
    text = render_text(report, "table", width=200)
    header = next(line for line in text.splitlines() if "method" in line)
    assert "phase" in header and "by phase prefill" in text
    assert sum(" decode " in line for line in text.splitlines()) >= 3
    csv_rows = list(csv.DictReader(io.StringIO(render_text(report, "csv"))))
    assert [row["phase"] for row in csv_rows] == [r.phase for r in report.results]
    assert csv_rows[-1]["phase"] == "decode"
    for fmt in ("json", "jsonl"):  # both forms keep each phase's part
        path = tmp_path / f"doc.{fmt}"
        path.write_text(render_text(report, fmt))
        again = load_document(path)
        assert [x.input.phase for x in again.layers] == ["prefill", "decode"]
        assert [r.phase for r in again.results] == [r.phase for r in report.results]


def test_a_prefill_document_has_no_phase_column_and_old_records_read_as_prefill():
    qkv = kdecli.load_input(SYN)
    report = kdecli.compare(qkv, ["exact", "uniform"], [16], seeds=1, timing=False)
    text = render_text(report, "table", width=200)
    assert "phase" not in next(line for line in text.splitlines() if "method" in line)
    doc = report.to_dict()
    assert "phase" not in doc["input"]
    for result in doc["results"]:
        del result["phase"]  # as before phases
    again = parse_document(json.dumps(doc), Path("old.json"))
    assert {r.phase for r in again.results} == {"prefill"}
    assert render_text(again, "table", width=200) == text


def test_the_plot_draws_a_series_and_a_floor_per_phase():
    pytest.importorskip("matplotlib")
    report = both_report()
    series, _ = collect_series(report, "budget", "rel_spectral")
    assert sorted((s.method, s.phase) for s in series if s.method == "uniform") == [
        ("uniform", "decode"), ("uniform", "prefill"),
    ]  # fmt: skip
    fig = figure([report], "budget")
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "uniform · decode" in labels and "uniform · prefill" in labels
    assert sum("mean-of-V floor" in label for label in labels) == 2


# ---- a capture of a causal model -----------------------------------------------------------------


@pytest.fixture
def capture(tmp_path):
    """Two causal layers laid out as `kdecli capture` writes them."""
    path = tmp_path / "capture.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["kdecli_capture"] = 1
        for layer in (0, 1):
            g = f.create_group(f"layer{layer}")
            q, k, v = (rng.standard_normal((1, 2, 40, 8)).astype(np.float32) for _ in range(3))
            g["q"], g["k"], g["v"] = q, k, v
            o = exact_attention(*(torch.from_numpy(t).double() for t in (q, k, v)), 0.25,
                                mask=Causal(0))  # fmt: skip
            g["o"] = o.float().numpy()
            g.attrs.update(layer=layer, scale=0.25, causal=True)
    return path


def test_decode_on_every_layer_of_a_capture(capture, tmp_path):
    out = tmp_path / "layers.json"
    res = invoke(
        "compare", f"{capture}:/layer*", "--methods", "exact,topk,mean", "--budgets", 8,
        "--phase", "both", "--queries", 2, "--no-timing", "-f", "json", "-o", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "not causal" not in res.output  # a causal capture needs no note
    doc = load_document(out)
    assert [(x.layer, x.input.phase) for x in doc.layers] == [
        (0, "prefill"), (0, "decode"), (1, "prefill"), (1, "decode"),
    ]  # fmt: skip
    exact = [r for r in doc.results if r.method == "exact"]
    assert [(r.layer, r.phase) for r in exact] == [(p.layer, p.input.phase) for p in doc.layers]
    assert all(r.errors["rel_spectral"].mean < 1e-5 for r in exact)
    rows = table_rows(doc)
    means = [r for r in rows if r.layer == "all" and r.method == "topk"]
    assert sorted(r.phase for r in means) == ["decode", "prefill"]  # a mean over layers per phase
    text = render_text(doc, "table", width=220)
    assert "2 layers: 0, 1" in text and "phases: prefill, decode" in text


def test_shards_of_a_run_over_both_phases_merge_whole(tmp_path):
    args = ("compare", SYN, "--methods", "exact,uniform,mean", "--budgets", "16,32", "--seeds", 1,
            "--phase", "both", "--queries", 4, "--no-timing", "-f", "jsonl", "-q")  # fmt: skip
    shards = [tmp_path / f"s{i}.jsonl" for i in range(2)]
    for i, path in enumerate(shards):
        res = invoke(*args, "--num-shards", 2, "--shard-id", i, "-o", path)
        assert res.exit_code == 0, res.output
    merged = tmp_path / "all.json"
    res = invoke("merge", *shards, "-o", merged)
    assert res.exit_code == 0, res.output
    doc = load_document(merged)
    assert [x.input.phase for x in doc.layers] == ["prefill", "decode"]
    assert sorted(r.phase for r in doc.results) == ["decode"] * 4 + ["prefill"] * 4
    assert doc.merge is None or not doc.merge.missing
    whole = load_document(shards[0])  # each shard's records are measured against its own part
    for record in whole.results:
        floor = whole.floors_of(None, record.phase)
        assert floor == doc.floors_of(None, record.phase)
