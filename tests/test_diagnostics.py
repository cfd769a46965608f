"""The diagnostics (``kdecli.measure.diagnostics``, ``--diagnostics``): density, mass recall, the
split of the error into selection and estimation, the row-sum error, per head.

Hand-made key sets (a method of this file, never registered) check the figures against an
independent dense float64 computation; the registered methods that report their sets are checked
for the triangle inequality and, where exact over their sets, for a zero estimation error."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from kdecli.cli.app import app
from kdecli.experiments.compare.records import Result, RunReport, jsonl_result, parse_document
from kdecli.experiments.compare.report import to_csv
from kdecli.experiments.compare.run import compare
from kdecli.masks import FULL, Causal
from kdecli.measure.config import RunConfig
from kdecli.measure.diagnostics import SharedAttention, diagnose, exact_rows
from kdecli.measure.figures import Diagnostics
from kdecli.measure.row_reference import sample_rows
from kdecli.methods import make_method, method_names
from kdecli.methods.base import AttentionMethod
from kdecli.methods.keysets import KeySets
from kdecli.qkv import QKV

B, H, N, D, DV = 2, 3, 47, 21, 13
SCALE = 0.3
TIGHT = 1e-10  # float64 inputs: what is zero by construction is zero to rounding


def _inputs(n_q: int = N, n_k: int = N, seed: int = 0) -> QKV:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n_q, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, n_k, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, n_k, DV, generator=g, dtype=torch.float64)
    return QKV(q, k, v, "test")


def _logits(qkv: QKV, mask=FULL) -> torch.Tensor:
    logits = SCALE * qkv.q @ qkv.k.transpose(-1, -2)
    allowed = mask.allowed(qkv.q.shape[-2], qkv.k.shape[-2])
    return logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))


def _random_sets(qkv: QKV, mask=FULL, share: float = 0.3, seed: int = 1) -> torch.Tensor:
    """A random set per query inside what the mask allows, never empty (the query's own key, or
    the last, is always in it)."""
    n_q, n_k = qkv.q.shape[-2], qkv.k.shape[-2]
    g = torch.Generator().manual_seed(seed)
    read = torch.rand(B, H, n_q, n_k, generator=g) < share
    allowed = mask.allowed(n_q, n_k)
    last = (torch.arange(n_q) + (mask.offset if mask.is_causal else n_k - 1)).clamp(max=n_k - 1)
    read[..., torch.arange(n_q), last] = True
    return read if allowed is None else read & allowed


class _OverSet(AttentionMethod):
    """Exact softmax over hand-made sets, plus ``noise`` × a fixed perturbation of the output
    (an estimator over the set that is not exact); ``row_sums`` its own log row sums."""

    name = "test_over_set"
    uses_budget = False
    supports_causal = True

    def __init__(self, read, noise=0.0, row_sums=None, sets=True):
        super().__init__()
        self.read, self.noise, self.row_sums, self.sets = read, noise, row_sums, sets

    def forward(self, q, k, v, scale, generator, mask):
        logits = (scale * q @ k.transpose(-1, -2)).masked_fill(~self.read, float("-inf"))
        out = torch.softmax(logits, dim=-1) @ v
        g = torch.Generator().manual_seed(7)
        return out + self.noise * torch.randn(out.shape, generator=g, dtype=out.dtype)

    def key_sets(self, q, k, v, scale, generator, mask=FULL):
        if not self.sets:
            return None
        return KeySets.from_dense(self.read, exact_over_set=self.noise == 0)

    def log_row_sums(self, q, k, v, scale, generator, mask=FULL):
        return self.row_sums


def _diagnosed(method, qkv: QKV, mask=FULL, reference=None) -> tuple[Diagnostics, torch.Tensor]:
    """The method's output and its diagnostics against the exact float64 output."""
    out = method(qkv.q, qkv.k, qkv.v, scale=SCALE, mask=mask, generator=None)
    if reference is None:
        reference = torch.softmax(_logits(qkv, mask), dim=-1) @ qkv.v
    return diagnose(method, qkv, qkv, reference, out, SCALE, mask, 0), out


def _split(diagnostics: Diagnostics, which: str, metric: str) -> torch.Tensor:
    return torch.tensor(getattr(diagnostics, which)[metric].per_slice, dtype=torch.float64)


# ---- the figures, against a dense float64 computation --------------------------------------------


@pytest.mark.parametrize("mask", [FULL, Causal(0)], ids=["full", "causal"])
def test_the_figures_of_hand_made_sets_match_a_dense_computation(mask):
    qkv = _inputs()
    read = _random_sets(qkv, mask)
    diagnostics, out = _diagnosed(_OverSet(read), qkv, mask)
    logits = _logits(qkv, mask)
    probs = torch.softmax(logits, dim=-1)
    allowed = torch.isfinite(logits)
    density = (read.double().sum(-1) / allowed.double().sum(-1)).mean(-1).reshape(-1)
    recall = (probs * read).sum(-1)
    assert diagnostics.density.per_slice == pytest.approx(density.tolist(), abs=TIGHT)
    assert diagnostics.mass_recall.per_slice == pytest.approx(
        recall.mean(-1).reshape(-1).tolist(), abs=TIGHT
    )
    # exact over its sets: the row sum is the set's, log D_S − log D = log recall, row by row
    lse = (-recall.log()).mean(-1).reshape(-1)
    assert diagnostics.lse_error.per_slice == pytest.approx(lse.tolist(), rel=1e-9)
    # exact over its sets: no estimation error, and its selection error is its whole error
    exact = probs @ qkv.v
    total = torch.linalg.matrix_norm(out - exact, ord=2) / torch.linalg.matrix_norm(exact, ord=2)
    assert max(_split(diagnostics, "estimation_error", "rel_spectral")) < TIGHT
    assert max(_split(diagnostics, "estimation_error", "rel_frobenius")) < TIGHT
    assert _split(diagnostics, "selection_error", "rel_spectral").tolist() == pytest.approx(
        total.reshape(-1).tolist(), rel=1e-9
    )
    assert diagnostics.note is None


def test_an_estimator_over_its_set_splits_its_error_and_the_triangle_inequality_holds():
    qkv = _inputs(seed=3)
    read = _random_sets(qkv, share=0.5)
    true_log_sums = torch.logsumexp(_logits(qkv), dim=-1)
    off = torch.full_like(true_log_sums, 0.25)
    method = _OverSet(read, noise=0.05, row_sums=true_log_sums + off)
    diagnostics, out = _diagnosed(method, qkv)
    exact = torch.softmax(_logits(qkv), dim=-1) @ qkv.v
    logits = _logits(qkv).masked_fill(~read, float("-inf"))
    over_set = torch.softmax(logits, dim=-1) @ qkv.v
    for metric, norm in (("rel_spectral", 2), ("rel_frobenius", "fro")):
        base = torch.linalg.matrix_norm(exact, ord=norm)
        total = torch.linalg.matrix_norm(out - exact, ord=norm) / base
        estimation = torch.linalg.matrix_norm(out - over_set, ord=norm) / base
        got_sel = _split(diagnostics, "selection_error", metric)
        got_est = _split(diagnostics, "estimation_error", metric)
        assert got_est.tolist() == pytest.approx(estimation.reshape(-1).tolist(), rel=1e-9)
        assert bool((got_est > 0.01).all())  # the noise is seen
        assert bool((got_sel + got_est >= total.reshape(-1) * (1 - 1e-12)).all())
    # the method's own row sums, 0.25 off in the log everywhere
    assert diagnostics.lse_error.per_slice == pytest.approx([0.25] * B * H, rel=1e-9)


def test_a_method_without_sets_gets_null_figures_and_its_note():
    qkv = _inputs()
    method = _OverSet(_random_sets(qkv), sets=False)
    diagnostics, _ = _diagnosed(method, qkv)
    assert (diagnostics.density, diagnostics.mass_recall, diagnostics.lse_error) == (None,) * 3
    assert diagnostics.selection_error is None and diagnostics.estimation_error is None
    assert method.key_set_note in diagnostics.note
    written = diagnostics.to_dict()
    assert written["density"] is None and written["selection_error"] is None


def test_row_sums_without_sets_give_the_lse_error_alone():
    qkv = _inputs()
    log_sums = torch.logsumexp(_logits(qkv), dim=-1)
    g = torch.Generator().manual_seed(5)
    noise = torch.rand(log_sums.shape, generator=g, dtype=torch.float64)
    method = _OverSet(_random_sets(qkv), row_sums=log_sums - noise, sets=False)
    diagnostics, _ = _diagnosed(method, qkv)
    assert diagnostics.density is None and diagnostics.selection_error is None
    assert diagnostics.lse_error.per_slice == pytest.approx(
        noise.mean(-1).reshape(-1).tolist(), rel=1e-9
    )
    assert "no key set" in diagnostics.note


def test_an_estimator_without_row_sums_says_why_it_has_no_lse_error():
    qkv = _inputs()
    diagnostics, _ = _diagnosed(_OverSet(_random_sets(qkv), noise=0.1), qkv)
    assert diagnostics.lse_error is None and diagnostics.density is not None
    assert "no lse_error" in diagnostics.note


def test_every_key_allowed_is_a_lossless_selection():
    qkv = _inputs(n_q=11, n_k=40)
    mask = Causal(40 - 11)
    read = mask.allowed(11, 40).expand(B, H, 11, 40)
    diagnostics, _ = _diagnosed(_OverSet(read), qkv, mask)
    assert diagnostics.density.per_slice == pytest.approx([1.0] * B * H)
    assert diagnostics.mass_recall.per_slice == pytest.approx([1.0] * B * H, abs=TIGHT)
    assert max(_split(diagnostics, "selection_error", "rel_spectral")) < TIGHT
    assert diagnostics.lse_error.max < TIGHT


def test_the_chunks_and_a_sample_of_rows_give_the_rows_figures():
    qkv = _inputs(n_q=N, n_k=61)
    read = _random_sets(qkv)
    sets = KeySets.from_dense(read)
    every = torch.arange(N)
    whole = exact_rows(qkv, SCALE, FULL, every, sets)
    chunked = exact_rows(qkv, SCALE, FULL, every, sets, memory_bytes=4000)  # a few rows a chunk
    some = torch.tensor([0, 5, 6, 30, 46])
    sampled = exact_rows(qkv, SCALE, FULL, some, sets, memory_bytes=4000)
    for name in ("log_sums", "density", "recall", "set_log_sums", "over_set"):
        assert torch.allclose(getattr(whole, name), getattr(chunked, name), rtol=1e-12)
        assert torch.allclose(
            getattr(whole, name).index_select(2, some), getattr(sampled, name), rtol=1e-12
        )


@pytest.mark.parametrize("mask", [FULL, Causal(0), Causal(13)], ids=str)
def test_the_shared_attention_gives_the_figures_each_call_computes(mask):
    n_k = N + (mask.offset if mask.is_causal else 11)
    qkv = _inputs(n_q=N, n_k=n_k)
    shared = SharedAttention()
    for seed, rows in [(1, torch.arange(N)), (2, torch.arange(N)), (3, torch.tensor([0, 5, 46]))]:
        sets = KeySets.from_dense(_random_sets(qkv, mask, seed=seed))
        alone = exact_rows(qkv, SCALE, mask, rows, sets, memory_bytes=4000)
        kept = exact_rows(qkv, SCALE, mask, rows, sets, memory_bytes=4000, shared=shared)
        for name in ("log_sums", "density", "recall", "set_log_sums", "over_set"):
            assert torch.allclose(getattr(alone, name), getattr(kept, name), rtol=1e-12), name
    # held once per input and rows; other rows, or too little memory, compute it again or not
    first = shared.of(qkv, SCALE, mask, torch.arange(N))
    assert shared.of(qkv, SCALE, mask, torch.arange(N)) is first
    assert shared.of(qkv, SCALE, mask, torch.tensor([0, 5, 46])) is not first
    assert SharedAttention(memory_bytes=8).of(qkv, SCALE, mask, torch.arange(N)) is None
    probabilities, log_sums = first
    allowed = mask.allowed(N, n_k)
    expected = torch.softmax(_logits(qkv, mask), dim=-1)
    assert torch.allclose(probabilities, expected, rtol=1e-12, atol=1e-300)
    assert allowed is None or not probabilities.masked_select(~allowed).any()


def test_under_a_row_sample_the_spectral_split_is_absent_with_the_reason():
    qkv = _inputs()
    read = _random_sets(qkv)
    sample = sample_rows(qkv.q, qkv.k, qkv.v, SCALE, 20, seed=3)
    diagnostics, _ = _diagnosed(_OverSet(read), qkv, reference=sample)
    assert diagnostics.selection_error["rel_spectral"].mean is None
    assert "row-sampled" in diagnostics.selection_error["rel_spectral"].note
    recall = (torch.softmax(_logits(qkv), dim=-1) * read).sum(-1)
    on_rows = recall.index_select(-1, sample.rows).mean(-1).reshape(-1)
    assert diagnostics.mass_recall.per_slice == pytest.approx(on_rows.tolist(), abs=TIGHT)
    assert diagnostics.estimation_error["rel_frobenius"].max < TIGHT
    assert "20 sampled rows" in diagnostics.note


def test_per_head_figures_pool_to_the_mean_over_every_row_of_every_head():
    qkv = _inputs()
    read = _random_sets(qkv)
    diagnostics, _ = _diagnosed(_OverSet(read), qkv)
    probs = torch.softmax(_logits(qkv), dim=-1)
    recall = (probs * read).sum(-1)  # (b, h, n_q): every head has n_q rows, so the mean pools
    assert len(diagnostics.mass_recall.per_slice) == B * H
    assert diagnostics.mass_recall.mean == pytest.approx(float(recall.mean()), abs=TIGHT)
    assert diagnostics.density.mean == pytest.approx(float(read.double().mean()), abs=TIGHT)
    assert diagnostics.mass_recall.max == pytest.approx(float(recall.mean(-1).max()), abs=TIGHT)


def test_a_failing_key_set_leaves_a_note_not_an_exception():
    class Broken(_OverSet):
        def key_sets(self, *args, **kwargs):
            raise RuntimeError("no sets today")

    qkv = _inputs()
    diagnostics, _ = _diagnosed(Broken(_random_sets(qkv)), qkv)
    assert diagnostics.note == "not computed: no sets today"
    assert diagnostics.density is None


# ---- the registered methods ----------------------------------------------------------------------


def _with_sets() -> dict[str, bool]:
    """The registered methods that report their sets on a small input, and whether each is
    exact over them (a method refused there is left out: it says so elsewhere)."""
    qkv = _inputs(n_q=64, n_k=64)
    found = {}
    for name in method_names():
        method = make_method(name, 16)
        if method.not_supported_reasons(qkv.q, qkv.k, qkv.v):
            continue
        g = torch.Generator().manual_seed(0)
        sets = method.key_sets(qkv.q, qkv.k, qkv.v, SCALE, g, FULL)
        if sets is not None:
            found[name] = sets.exact_over_set
    return found


_SETS = _with_sets()
WITH_SETS = list(_SETS)
EXACT_OVER_SETS = [name for name, exact in _SETS.items() if exact]


def test_some_registered_method_reports_its_sets():
    assert "topk" in EXACT_OVER_SETS


@pytest.mark.parametrize("name", WITH_SETS)
@pytest.mark.parametrize("mask", [FULL, Causal(0)], ids=["full", "causal"])
def test_selection_and_estimation_bound_the_total_error(name, mask):
    qkv = _inputs(n_q=64, n_k=64, seed=11)
    report = compare(qkv, [name], [16], timing=False, causal=mask.is_causal)
    for record in report.results:
        if not record.ok:
            continue
        diagnostics = record.diagnostics
        assert diagnostics is not None and diagnostics.density is not None, record.reason
        for metric in ("rel_spectral", "rel_frobenius"):
            total = torch.tensor(record.errors[metric].per_slice, dtype=torch.float64)
            selection = _split(diagnostics, "selection_error", metric)
            estimation = _split(diagnostics, "estimation_error", metric)
            assert bool((selection + estimation >= total * (1 - 1e-9) - 1e-12).all()), metric
        assert all(0 < x <= 1 for x in diagnostics.density.per_slice)
        assert all(0 <= x <= 1 + 1e-9 for x in diagnostics.mass_recall.per_slice)


@pytest.mark.parametrize("name", EXACT_OVER_SETS)
def test_a_method_exact_over_its_sets_has_no_estimation_error(name):
    qkv = _inputs(n_q=64, n_k=64, seed=12)
    report = compare(qkv, [name], [16], timing=False, seeds=1, scale=SCALE)
    diagnostics = report.results[0].diagnostics
    assert diagnostics.estimation_error["rel_spectral"].max < 1e-9
    assert diagnostics.estimation_error["rel_frobenius"].max < 1e-9


def test_topk_keeps_its_top_probabilities():
    qkv = _inputs(n_q=50, n_k=50, seed=13)
    m = 9
    report = compare(qkv, ["topk"], [m], timing=False, scale=SCALE)
    diagnostics = report.results[0].diagnostics
    probs = torch.softmax(_logits(qkv), dim=-1)
    kept = probs.topk(m, dim=-1).values.sum(-1).mean(-1).reshape(-1)  # the m largest, directly
    assert diagnostics.mass_recall.per_slice == pytest.approx(kept.tolist(), abs=1e-12)
    assert diagnostics.density.per_slice == pytest.approx([m / 50] * B * H)
    assert diagnostics.estimation_error["rel_spectral"].max < 1e-12
    total = report.results[0].errors["rel_spectral"].per_slice
    assert diagnostics.selection_error["rel_spectral"].per_slice == pytest.approx(total, rel=1e-9)


# ---- the run: on or off, the existing figures unchanged, the documents ----------------------------


def test_the_diagnostics_change_no_existing_figure():
    qkv = _inputs(n_q=40, n_k=40, seed=14).to("cpu", torch.float32)
    run = {"seeds": 2, "repeats": 1, "warmup": 0, "min_time": 0.0}
    on = compare(qkv, ["topk", "uniform"], [8], diagnostics=True, **run)
    off = compare(qkv, ["topk", "uniform"], [8], diagnostics=False, **run)
    assert len(on.results) == len(off.results) == 3
    for a, b in zip(on.results, off.results, strict=True):
        assert a.diagnostics is not None and b.diagnostics is None
        first, second = a.to_dict(), b.to_dict()
        assert first.pop("diagnostics") and "diagnostics" not in second
        assert first["errors"] == second["errors"] and first["key"] == second["key"]
        assert _structure(first.pop("time")) == _structure(second.pop("time"))
        first.pop("environment"), second.pop("environment")
        assert first == second


def _structure(value):
    if isinstance(value, dict):
        return {key: _structure(v) for key, v in value.items()}
    return type(value).__name__


def test_on_by_default_under_a_full_reference_and_off_under_rows():
    assert RunConfig().diagnoses(sampled=False) and not RunConfig().diagnoses(sampled=True)
    assert RunConfig(diagnostics=True).diagnoses(sampled=True)
    assert not RunConfig(diagnostics=False).diagnoses(sampled=False)
    qkv = _inputs(n_q=40, n_k=40).to("cpu", torch.float32)
    sampled = compare(qkv, ["topk"], [8], timing=False, reference="rows:10")
    assert sampled.results[0].diagnostics is None
    asked = compare(qkv, ["topk"], [8], timing=False, reference="rows:10", diagnostics=True)
    assert asked.results[0].diagnostics.mass_recall is not None


def test_documents_keep_them_and_old_ones_load_without():
    qkv = _inputs(n_q=40, n_k=40).to("cpu", torch.float32)
    report = compare(qkv, ["topk", "performer"], [8], timing=False, seeds=1)
    doc = json.loads(json.dumps(report.to_dict()))
    again = RunReport.from_dict(doc)
    assert [r.to_dict() for r in again.results] == [r.to_dict() for r in report.results]
    assert again.results[1].diagnostics.density is None  # performer: no key set, with its note
    assert again.results[1].diagnostics.note
    # a JSONL stream (resume files, shards) carries them in each result line
    text = "\n".join(
        [json.dumps({"type": "run", **report.header_dict()})]
        + [jsonl_result(r) for r in report.results]
    )
    streamed = parse_document(text + "\n", "x.jsonl")
    assert streamed.results[0].diagnostics.to_dict() == report.results[0].diagnostics.to_dict()
    # a result written before the diagnostics reads as one without them
    old = {k: v for k, v in report.results[0].to_dict().items() if k != "diagnostics"}
    assert Result.from_dict(old).diagnostics is None
    assert "diagnostics" not in Result.from_dict(old).to_dict()


def test_csv_rows_carry_them_after_the_earlier_columns():
    qkv = _inputs(n_q=40, n_k=40).to("cpu", torch.float32)
    report = compare(qkv, ["topk", "performer"], [8], timing=False, seeds=1)
    rows = list(csv.DictReader(io.StringIO(to_csv(report))))
    header = to_csv(report).splitlines()[0].split(",")
    assert header.index("phase") < header.index("density_mean")  # appended: old readers keep theirs
    topk, performer = (next(r for r in rows if r["method"] == m) for m in ("topk", "performer"))
    found = report.results[0].diagnostics
    assert float(topk["density_mean"]) == pytest.approx(found.density.mean)
    assert float(topk["mass_recall_max"]) == pytest.approx(found.mass_recall.max)
    split = found.selection_error["rel_spectral"]
    assert float(topk["selection_error_mean"]) == pytest.approx(split.mean)
    assert float(topk["estimation_error_mean"]) == pytest.approx(0.0, abs=1e-6)
    assert performer["density_mean"] == "" and performer["diagnostics_note"]
    assert float(performer["lse_error_mean"]) >= 0  # its own row sums


def test_the_table_shows_them_when_asked_and_the_quick_start_keeps_its_columns(tmp_path):
    runner = CliRunner()
    args = ["compare", "synthetic:n=128,d=16", "--methods", "topk,uniform", "--budgets", "16"]
    args += ["--no-timing", "--seeds", "1", "--quiet"]
    asked = runner.invoke(
        app, [*args, "--columns", "method,budget,density,recall,sel_err,est_err,lse_err"]
    )
    assert asked.exit_code == 0, asked.output
    topk = next(line for line in asked.output.splitlines() if "topk" in line)
    assert "0.1250" in topk  # density 16/128
    plain = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert plain.exit_code == 0, plain.output
    assert "density" not in plain.output and "recall" not in plain.output
    out = tmp_path / "off.json"
    off = runner.invoke(app, [*args, "--no-diagnostics", "--output", str(out)])
    assert off.exit_code == 0, off.output
    assert all("diagnostics" not in r for r in json.loads(out.read_text())["results"])
    refused = runner.invoke(app, [*args, "--no-diagnostics", "--columns", "density"])
    assert refused.exit_code == 2 and "density" in refused.output


def test_an_infinite_row_sum_error_is_kept_as_such():
    # an empty set reads nothing: no output, and an infinite log row-sum error
    qkv = _inputs(n_q=5, n_k=9)
    read = torch.zeros(B, H, 5, 9, dtype=torch.bool)
    read[..., 1:, :] = True
    sets = KeySets.from_dense(read)
    rows = exact_rows(qkv, SCALE, FULL, torch.arange(5), sets)
    assert bool((rows.over_set[..., 0, :] == 0).all()) and math.isinf(
        float(rows.set_log_sums[0, 0, 0])
    )


@pytest.mark.parametrize("name", ["h2o", "snapkv", "streaming"])
def test_decode_steps_are_diagnosed_over_the_sets_each_step_read(name):
    qkv = _inputs(n_q=80, n_k=80, seed=15)
    qkv.default_causal = True
    report = compare(qkv, [name], [12], timing=False, phase="decode", queries=5)
    (record,) = report.results
    assert record.ok, record.reason
    diagnostics = record.diagnostics
    assert diagnostics.note is None
    # exact over what each step read; the steps read at most 12 + the sinks/window of the rule
    assert diagnostics.estimation_error["rel_spectral"].max < 1e-9
    assert all(0 < x < 0.5 for x in diagnostics.density.per_slice)
    total = record.errors["rel_spectral"].per_slice
    assert diagnostics.selection_error["rel_spectral"].per_slice == pytest.approx(total, rel=1e-6)


def test_a_setting_summarises_its_seeds_diagnostics_and_says_why_they_are_null():
    from kdecli.experiments.compare.aggregate import aggregate

    qkv = _inputs(n_q=40, n_k=40).to("cpu", torch.float32)
    report = compare(qkv, ["magicpig", "performer"], [8], timing=False, seeds=3)
    pig, performer = aggregate(report.results)
    means = [r.diagnostics.mass_recall.mean for r in pig.records]
    assert len(set(means)) > 1  # random sets: each seed its own draw
    assert pig.diagnostic("mass_recall").mean == pytest.approx(sum(means) / 3)
    split = [r.diagnostics.estimation_error["rel_frobenius"].mean for r in pig.records]
    assert pig.diagnostic("estimation_error", "rel_frobenius").per_seed == tuple(split)
    assert performer.diagnosed and performer.diagnostic("density") is None
    assert "every key" in performer.diagnostics_note
