"""--backward: one forward + backward of each method and of SDPA, timed beside the forward."""

import csv
import io
import json

import pytest
import torch
from typer.testing import CliRunner

import kdecli
from kdecli.cli import app
from kdecli.experiments.compare.records import RunReport, to_json
from kdecli.experiments.compare.report import render_text, to_csv, to_markdown
from kdecli.masks import FULL
from kdecli.measure import timed as timed_calls
from kdecli.measure.grads import GradInputs
from kdecli.measure.timed import TimingOptions
from kdecli.methods import method_of_role, registry
from kdecli.methods.base import AttentionMethod

cli = CliRunner()
SYN = "synthetic:n=512,d=16"


@pytest.fixture(scope="module")
def qkv():
    return kdecli.load_input(SYN)


class Detached(AttentionMethod):
    """A forward that works, with an output cut from the graph: no gradient can flow."""

    name = "detached"
    summary = paper = "test only"
    uses_budget = False

    def forward_full(self, q, k, v, scale, generator):
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


class _Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("no backward here")


class RaisesInBackward(AttentionMethod):
    """A forward that works and a backward that raises."""

    name = "raises_backward"
    summary = paper = "test only"
    uses_budget = False

    def forward_full(self, q, k, v, scale, generator):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        return _Boom.apply(out)


class NoGrad(AttentionMethod):
    """A method that says it cannot differentiate (``not_supported_reasons`` of grad inputs)."""

    name = "no_grad"
    summary = paper = "test only"
    uses_budget = False

    def not_supported_reasons(self, q, k, v, mask=FULL):
        reasons = super().not_supported_reasons(q, k, v, mask)
        if q.requires_grad or k.requires_grad or v.requires_grad:
            reasons.append("no autograd support")
        return reasons

    def forward_full(self, q, k, v, scale, generator):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def timed(report):
    return {r.method: r.time for r in report.results}


def test_backward_is_timed_beside_the_forward_for_methods_and_exact(qkv):
    report = kdecli.compare(
        qkv, ["exact", "performer", "uniform"], [32], seeds=1, backward=True, min_time=0.02
    )
    times = timed(report)
    assert set(times) == {"exact", "performer", "uniform"}
    exact_backward = {t.exact_backward_s.median for t in times.values()}
    assert len(exact_backward) == 1  # SDPA's forward + backward timed once per run
    for name, time in times.items():  # (how the two times compare: benchmarks/bench_timing.py)
        assert time.backward_s is not None and time.backward_note is None, name
        assert time.backward_s.median > 0 and time.exact_backward_s.median > 0, name
        assert time.backward_speedup == pytest.approx(
            time.exact_backward_s.median / time.backward_s.median
        )
        assert time.backward_s.memory_source in ("rss", None) and time.backward_s.repeats >= 3
    assert all(r.status == "ok" for r in report.results)


def test_without_backward_nothing_is_timed_and_json_has_no_keys(qkv, monkeypatch):
    calls = []
    real = timed_calls.time_call

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(timed_calls, "time_call", counting)
    report = kdecli.compare(qkv, ["exact", "performer"], [32], seeds=1, repeats=1)
    assert len(calls) == 3  # exact attention, then each method: forwards only
    for time in timed(report).values():
        assert time.backward_s is None and time.exact_backward_s is None
        assert time.backward_speedup is None and time.backward_note is None
    doc = json.loads(to_json(report))
    for result in doc["results"]:
        assert not {"backward_s", "exact_backward_s", "backward_speedup", "backward_note"} & set(
            result["time"]
        )
    table = render_text(report, "table", width=200)
    assert "fwd+bwd" not in table and "fwd+bwd" not in to_markdown(report)
    calls.clear()
    kdecli.compare(qkv, ["exact", "performer"], [32], seeds=1, repeats=1, backward=True)
    assert len(calls) == 6  # and with it: each once more


def test_a_failing_backward_keeps_the_forward_record_with_a_note(qkv, monkeypatch):
    for cls in (Detached, RaisesInBackward, NoGrad):
        monkeypatch.setitem(registry._REGISTRY, cls.name, cls)
    names = ["detached", "raises_backward", "no_grad", "performer"]
    report = kdecli.compare(qkv, names, [32], seeds=1, repeats=1, backward=True)
    by = {r.method: r for r in report.results}
    for name in names[:3]:
        record = by[name]
        assert record.status == "ok" and record.reason is None, name
        assert record.errors["rel_spectral"].mean < 1e-5  # the forward's errors stand
        assert record.time.method_s is not None and record.time.speedup > 0
        assert record.time.backward_s is None and record.time.backward_speedup is None
        assert record.time.exact_backward_s is not None  # what it would be compared with
    assert "does not require grad" in by["detached"].time.backward_note
    assert by["raises_backward"].time.backward_note == (
        "backward failed: RuntimeError: no backward here"
    )
    assert by["no_grad"].time.backward_note == "backward not supported: no autograd support"
    assert by["performer"].time.backward_s is not None  # the others still run
    table = render_text(report, "table", width=200)
    assert "fwd+bwd not timed:" in table and "no autograd support" in table
    back = RunReport.from_dict(json.loads(to_json(report)))
    assert back.results[1].time.backward_note == by["raises_backward"].time.backward_note


def test_exact_backward_past_its_reach_is_extrapolated_from_rows(qkv):
    options = TimingOptions(repeats=1, warmup=1)
    grads = GradInputs.of(qkv, 0, torch.device("cpu"))
    b, h, n, d = qkv.q.shape
    cost = method_of_role("reference")().cost(b, h, n, n, d, d, FULL)
    limit = 2 * cost  # the forward is within reach, a forward + backward (3 forwards) is not
    forward = timed_calls.time_exact(qkv, 0.25, FULL, options, limit_flops=limit, rows=128)
    both = timed_calls.time_exact(
        qkv, 0.25, FULL, options, limit_flops=limit, rows=128, grads=grads
    )
    assert forward.extrapolated_rows is None
    assert both.extrapolated_rows == 128 and both.peak_memory_bytes is None
    full = timed_calls.time_exact(qkv, 0.25, FULL, options, grads=grads)
    assert full.extrapolated_rows is None


def test_the_command_writes_the_fields_and_the_table_shows_the_columns(tmp_path):
    args = ["compare", SYN, "--methods", "exact,performer", "--budgets", "32", "--backward"]
    res = cli.invoke(app, [*args, "-f", "json", "--min-time", "0.05"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    for result in doc["results"]:
        time = result["time"]
        assert time["backward_s"]["median"] > 0 and time["exact_backward_s"]["median"] > 0
        assert time["backward_speedup"] > 0
    path = tmp_path / "r.json"
    path.write_text(res.stdout)
    again = cli.invoke(app, ["report", str(path), "-f", "json"])
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["results"] == doc["results"]
    table = cli.invoke(app, ["report", str(path)], env={"COLUMNS": "200"})
    header = " ".join(table.stdout.split("┡")[0].split())
    assert "fwd+bwd" in header and "speed-up" in header, table.stdout
    markdown = cli.invoke(app, ["report", str(path), "-f", "markdown"]).stdout
    assert "| fwd+bwd |" in markdown and "| fwd+bwd speed-up |" in markdown
    rows = list(
        csv.DictReader(io.StringIO(cli.invoke(app, ["report", str(path), "-f", "csv"]).stdout))
    )
    assert all(float(row["backward_s_median"]) > 0 for row in rows)
    assert all(float(row["backward_speedup"]) > 0 for row in rows)
    plain = cli.invoke(app, ["compare", SYN, "--methods", "exact", "--no-backward", "-f", "csv"])
    assert plain.exit_code == 0, plain.stderr
    assert next(csv.DictReader(io.StringIO(plain.stdout)))["backward_s_median"] == ""


def test_approx_takes_backward_from_the_library_and_the_command(qkv):
    report = kdecli.approx(qkv, "performer", 32, backward=True, repeats=1)
    assert report.results[0].time.backward_s is not None
    res = cli.invoke(app, ["approx", SYN, "-m", "performer", "-b", "32", "--backward", "-f", "csv"])
    assert res.exit_code == 0, res.stderr
    assert float(next(csv.DictReader(io.StringIO(res.stdout)))["backward_s_median"]) > 0
    assert "backward_note" in to_csv(report).splitlines()[0].split(",")


def test_the_timed_step_differentiates_every_input_against_the_fixed_gradient(qkv):
    grads = GradInputs.of(qkv, 0, torch.device("cpu"))
    assert all(t.is_leaf and t.requires_grad for t in (grads.q, grads.k, grads.v))
    assert grads.grad_out.shape == qkv.q.shape[:-1] + qkv.v.shape[-1:]

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    with torch.no_grad():  # the step turns autograd on itself, as the timing pass runs it
        got = grads.step(sdpa)()
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (qkv.q, qkv.k, qkv.v))
    (sdpa(q, k, v) * grads.grad_out).sum().backward()
    for mine, want in zip(got, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(mine, want)
    assert grads.q.grad is None  # fresh gradients each call: nothing accumulates on the leaves
    other = GradInputs.of(qkv, 0, torch.device("cpu"))
    assert torch.equal(other.grad_out, grads.grad_out)  # fixed: seeded from the run seed
