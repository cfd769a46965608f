"""Decode: ``kdecli.hf.patch(..., phase=...)`` inside a generation, and ``drift --generate``.

Oracles: transformers' own ``generate`` (stock SDPA), token for token and logit for logit; the
phase of each attention call, counted and compared against stock; the first divergence, token
agreement, per-step KL and top-1 agreement recomputed here from stock generations and a
teacher-forcing loop written in this file.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kdecli.cli import app
from kdecli.errors import UsageError
from kdecli.experiments.drift.generate import first_divergence, greedy, step_kl, token_agreement
from kdecli.methods.exact import Exact
from tests._models import build, needs_hf, save_models, train_tokenizer, write_text

pytestmark = needs_hf
N, T = 24, 10
runner = CliRunner()


@pytest.fixture(scope="module")
def llama():
    """The tiny GQA + RoPE decoder with sharper attention than its initialisation gives (random
    weights at std 0.02 attend almost uniformly, where every method is nearly exact)."""
    model = build("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(2, 300, (1, N), generator=torch.Generator().manual_seed(5))


def _generate(model, prompt, steps=T):
    """transformers' greedy generate: the new tokens and each step's logits."""
    with torch.inference_mode():
        out = model.generate(
            prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=1,
        )  # fmt: skip
    return out.sequences[0, prompt.shape[1] :], torch.cat(out.logits)


def _forced_logp(model, prompt, tokens):
    """Teacher forcing written out here: the prompt, then each exact token fed through the
    model's KV cache; log p of each step (float64)."""
    logps = []
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        for t in range(len(tokens)):
            logps.append(torch.log_softmax(out.logits[0, -1].double(), -1))
            out = model(input_ids=tokens[t].view(1, 1), cache=out.cache, use_cache=True)
    return torch.stack(logps)


# ---- patch(phase=...) -----------------------------------------------------------------------------


def test_exact_in_the_decode_steps_is_stock_generate(llama, prompt):
    import kdecli.hf

    tokens, logits = _generate(llama, prompt)
    with kdecli.hf.patch(llama, "exact", layers=None, phase="decode") as bound:
        patched_tokens, patched_logits = _generate(llama, prompt)
        ours = greedy(llama, prompt, T)
    assert torch.equal(patched_tokens, tokens)
    assert torch.allclose(patched_logits, logits, rtol=0, atol=1e-5)
    assert torch.equal(ours.tokens, tokens)
    assert torch.allclose(ours.logp, torch.log_softmax(logits.double(), -1), rtol=0, atol=1e-5)
    # two generations of T tokens: T − 1 decode steps each in each of the 3 layers
    assert bound.handler.approximated == {"decode": 2 * 3 * (T - 1)}
    assert bound.handler.left_stock == {"prefill": 2 * 3}


def test_decode_phase_leaves_the_prefill_stock_and_changes_the_decode_steps(llama, prompt):
    import kdecli.hf

    tokens, logits = _generate(llama, prompt)
    with kdecli.hf.patch(llama, "topk", budget=2, phase="decode") as bound:
        _, decode_logits = _generate(llama, prompt)
    assert torch.equal(decode_logits[0], logits[0])  # step 0 comes from the prompt's forward
    assert (decode_logits[1:] - logits[1:]).abs().max() > 1e-3
    assert set(bound.handler.approximated) == {"decode"}
    assert bound.handler.left_stock == {"prefill": 3}


def test_prefill_phase_changes_the_prompt_and_leaves_the_decode_steps_stock(llama, prompt):
    import kdecli.hf

    _, logits = _generate(llama, prompt)
    with kdecli.hf.patch(llama, "topk", budget=2, phase="prefill") as bound:
        _, prefill_logits = _generate(llama, prompt)
    assert (prefill_logits[0] - logits[0]).abs().max() > 1e-3
    assert bound.handler.approximated == {"prefill": 3}
    assert bound.handler.left_stock == {"decode": 3 * (T - 1)}
    # a decode step left stock is the stock step on the same cache: the same model call with no
    # patch at all gives the same logits
    with torch.inference_mode():
        cache = llama(input_ids=prompt, use_cache=True).cache
        stock_step = llama(input_ids=prompt[:, -1:], cache=cache).logits
    with torch.inference_mode(), kdecli.hf.patch(llama, "topk", budget=2, phase="prefill"):
        cache = llama(input_ids=prompt, use_cache=True).cache
        length = cache.get_seq_length()
        approx_cache_step = llama(input_ids=prompt[:, -1:], cache=cache).logits
        assert cache.get_seq_length() == length + 1  # the model's own cache object grew
    assert not torch.equal(approx_cache_step, stock_step)  # the cache came from a patched prefill


def test_both_phases_is_todays_patch(llama, prompt):
    import kdecli.hf

    with kdecli.hf.patch(llama, "topk", budget=2) as default:
        _, both = _generate(llama, prompt)
    with kdecli.hf.patch(llama, "topk", budget=2, phase="both") as named:
        _, again = _generate(llama, prompt)
    assert torch.equal(both, again)
    assert default.handler.approximated == {"prefill": 3, "decode": 3 * (T - 1)}
    assert named.handler.left_stock == {}


def test_patch_restores_the_model_after_a_decode_patch(llama, prompt):
    import kdecli.hf

    tokens, logits = _generate(llama, prompt)
    with kdecli.hf.patch(llama, "uniform", budget=4, phase="decode"):
        inside = _generate(llama, prompt)[1]
    assert not torch.equal(inside, logits)
    after_tokens, after_logits = _generate(llama, prompt)
    assert torch.equal(after_tokens, tokens) and torch.equal(after_logits, logits)
    assert llama.config._attn_implementation == "sdpa"


def test_a_bad_phase_is_a_usage_error(llama):
    import kdecli.hf

    with pytest.raises(UsageError, match="phase must be one of both, prefill, decode"):
        with kdecli.hf.patch(llama, "exact", phase="generate"):
            pass
    assert llama.config._attn_implementation == "sdpa"


# ---- the figures on constructed cases ------------------------------------------------------------


def test_first_divergence_and_token_agreement_on_constructed_sequences():
    assert first_divergence([1, 2, 3, 4], [1, 2, 5, 4]) == 2
    assert first_divergence([1, 2, 3, 4], [9, 2, 3, 4]) == 0
    assert first_divergence([1, 2, 3, 4], [1, 2, 3, 4]) == 4  # never: counts as T
    assert first_divergence(torch.tensor([7, 8]), torch.tensor([7, 9])) == 1
    assert token_agreement([1, 2, 3, 4], [1, 2, 5, 4]) == 0.75
    assert token_agreement([1, 2], [3, 4]) == 0.0
    with pytest.raises(ValueError):
        first_divergence([1, 2], [1, 2, 3])
    p = torch.log_softmax(torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64), -1)
    q = torch.log_softmax(torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64), -1)
    expected = (p[0].exp() * (p[0] - q[0])).sum()
    assert torch.allclose(step_kl(p, q), torch.stack([expected, torch.zeros((), dtype=p.dtype)]))


class LateFault(Exact):
    """Exact attention until the cache holds ``N + STEP`` keys, then every query reads only the
    first value, scaled up: forced to differ from step ``STEP`` on (the logits of step t come
    from the call over N + t keys)."""

    name = "late-fault"
    role = "approximation"
    STEP = 4

    def forward(self, q, k, v, scale, generator, mask):
        out = super().forward(q, k, v, scale, generator, mask)
        if k.shape[-2] < N + self.STEP:
            return out
        return 50 * v[..., :1, :].expand_as(out)


# ---- drift --generate ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, text_file, llama):
    dirs = save_models(tmp_path_factory.mktemp("models"), train_tokenizer(text_file))
    llama.save_pretrained(dirs["llama"])  # the sharper decoder, with the saved tokenizer
    return dirs


def _prompts(folder, text_file, chunks):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(text_file.read_text("utf-8"))["input_ids"]
    return torch.tensor(ids[: N * chunks]).view(chunks, N)


def _drift(folder, text_file, methods, budgets=(2,), **kwargs):
    from kdecli.hf import drift

    options = dict(tokens=N, chunks=2, seeds=1, device="cpu", generate=T, timing=False)
    return drift(folder, text_file, methods, budgets, **{**options, **kwargs})


def test_the_first_divergence_of_a_method_forced_to_differ(model_dirs, text_file, llama):
    import kdecli.hf

    report = _drift(model_dirs["llama"], text_file, [LateFault(), "exact"])
    fault, exact = (r.generation for r in report.results)
    assert report.generate == T and report.phase == "decode"
    assert fault.first_divergence.mean == LateFault.STEP and fault.never_diverged == 0
    assert exact.first_divergence.mean == T and exact.never_diverged == exact.generations == 2
    assert exact.token_agreement.mean == 1.0 and exact.kl.mean == 0.0
    assert fault.kl_per_step[: LateFault.STEP] == (0.0,) * LateFault.STEP
    assert min(fault.kl_per_step[LateFault.STEP :]) > 1e-3
    # the same, from transformers' own generate under the same patch
    for prompt in _prompts(model_dirs["llama"], text_file, 2):
        stock, _ = _generate(llama, prompt[None])
        with kdecli.hf.patch(llama, LateFault(), phase="decode"):
            faulty, _ = _generate(llama, prompt[None])
        assert first_divergence(stock, faulty) == LateFault.STEP


def test_token_agreement_kl_and_top1_recomputed_here(model_dirs, text_file, llama):
    import kdecli.hf

    report = _drift(model_dirs["llama"], text_file, ["topk"], [2])
    figures = report.results[0].generation
    agreements, divergences, kls, top1s, nll = [], [], [], [], 0.0
    for prompt in _prompts(model_dirs["llama"], text_file, 2):
        stock, logits = _generate(llama, prompt[None])
        with kdecli.hf.patch(llama, "topk", budget=2, phase="decode"):
            free, _ = _generate(llama, prompt[None])
            forced = _forced_logp(llama, prompt[None], stock)
        p = torch.log_softmax(logits.double(), -1)
        agreements.append(float((free == stock).double().mean()))
        divergences.append(next((t for t in range(T) if free[t] != stock[t]), T))
        kls.append(torch.nn.functional.kl_div(forced, p, log_target=True, reduction="none").sum(-1))
        top1s.append((forced.argmax(-1) == stock).double())
        nll -= float(forced.gather(-1, stock[:, None]).sum())
    assert figures.token_agreement.mean == pytest.approx(sum(agreements) / 2, abs=1e-12)
    assert figures.first_divergence.mean == pytest.approx(sum(divergences) / 2)  # median of 2
    curve = (kls[0] + kls[1]) / 2
    assert torch.allclose(torch.tensor(figures.kl_per_step, dtype=torch.float64), curve, atol=1e-6)
    assert figures.kl.mean == pytest.approx(float(curve.mean()), abs=1e-6)
    assert figures.kl_per_step[0] == 0.0 and figures.kl.mean > 1e-4  # the prefill is stock
    top1 = (top1s[0] + top1s[1]) / 2
    assert figures.top1_agreement_per_step == pytest.approx(top1.tolist())
    assert figures.perplexity.mean == pytest.approx(float(torch.tensor(nll / (2 * T)).exp()))
    assert report.floor.method == "mean" and report.floor.generation.kl.mean > 0


def test_prefill_phase_moves_the_first_step(model_dirs, text_file):
    decode = _drift(model_dirs["llama"], text_file, ["topk"], chunks=1).results[0].generation
    prefill = _drift(model_dirs["llama"], text_file, ["topk"], chunks=1, phase="prefill")
    assert prefill.phase == "prefill"
    assert decode.kl_per_step[0] == 0.0 and prefill.results[0].generation.kl_per_step[0] > 1e-4


def test_a_method_that_fails_in_a_generation_is_reported_and_the_others_kept(model_dirs, text_file):
    class Broken(Exact):
        name = "broken"
        role = "approximation"

        def forward(self, q, k, v, scale, generator, mask):
            raise RuntimeError("boom")

    report = _drift(model_dirs["llama"], text_file, [Broken(), "uniform"], [4], chunks=1)
    broken, uniform = report.results
    assert broken.status == "error" and broken.generation is None
    assert uniform.ok and uniform.generation.steps == T


def test_bad_generate_requests_are_usage_errors(model_dirs, text_file):
    folder = model_dirs["llama"]
    for kwargs, match in [
        ({"generate": 0}, "--generate must be a positive number"),
        ({"generate": -3}, "--generate must be a positive number"),
        ({"phase": "sideways"}, "--phase must be one of decode, prefill, both"),
        ({"generate": 64}, "24 \\+ --generate 64 = 88 positions"),
        ({"generate": None, "phase": "decode"}, "--phase goes with --generate"),
    ]:
        with pytest.raises(UsageError, match=match):
            _drift(folder, text_file, ["uniform"], **kwargs)
    with pytest.raises(UsageError, match="is an encoder"):
        _drift(model_dirs["bert"], text_file, ["uniform"])


def test_the_generation_document_reads_back(model_dirs, text_file, tmp_path):
    from kdecli.experiments.documents import load_any
    from kdecli.experiments.drift.records import DriftReport, load_drift

    report = _drift(model_dirs["llama"], text_file, ["uniform"], [4], chunks=1)
    doc = report.to_dict()
    assert doc["schema_version"] == 2 and doc["generate"] == T and doc["phase"] == "decode"
    assert DriftReport.from_dict(json.loads(json.dumps(doc))).to_dict() == doc
    path = tmp_path / "gen.json"
    path.write_text(json.dumps(doc))
    assert load_drift(path).results[0].generation == report.results[0].generation
    assert load_any(path) is not None


def test_a_generation_document_plots_its_curves_and_figures(model_dirs, text_file, tmp_path):
    pytest.importorskip("matplotlib")
    from kdecli.experiments.drift.plot import figure

    report = _drift(model_dirs["llama"], text_file, ["uniform"], [2, 4], chunks=1)
    (ax,) = figure(report, "step").axes[:1]
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_gid() == "method"}
    assert set(lines) == {"uniform @ 2", "uniform @ 4"}
    curve = report.results[1].generation.kl_per_step
    assert list(lines["uniform @ 4"].get_ydata()) == [v for v in curve if v is not None]
    assert [line.get_label() for line in ax.get_lines() if line.get_gid() == "floor"]
    (ax,) = figure(report, "budget", "token_agreement").axes[:1]
    (line,) = [line for line in ax.get_lines() if line.get_gid() == "method"]
    expected = [r.generation.token_agreement.mean for r in report.results]
    assert list(line.get_ydata()) == expected
    with pytest.raises(UsageError, match="no result with status ok has"):
        figure(report, "budget", "cosine")
    plain = _drift(model_dirs["llama"], text_file, ["uniform"], [4], chunks=1, generate=None)
    with pytest.raises(UsageError, match="run without --generate"):
        figure(plain, "step")


# ---- the command line ----------------------------------------------------------------------------


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_generate_json_table_and_csv(model_dirs, text_file, tmp_path):
    common = ("--text", text_file, "--tokens", N, "--chunks", 1, "--device", "cpu", "--seeds", 1)
    out = tmp_path / "gen.json"
    res = _cli("drift", model_dirs["llama"], *common, "--methods", "topk,uniform",
               "--budgets", 2, "--generate", T, "--repeats", 1, "-f", "json", "-o", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    for result in doc["results"]:
        generation = result["generation"]
        for name in ("token_agreement", "first_divergence", "kl", "top1_agreement"):
            assert generation[name]["mean"] is not None
        assert len(generation["kl_per_step"]) == len(generation["top1_agreement_per_step"]) == T
        assert result["time"]["method_s"]["median"] > 0
    assert doc["floor"]["generation"]["steps"] == T
    res = _cli("drift", model_dirs["llama"], *common, "--methods", "kdeformer", "--budgets", 8,
               "--generate", 4, "--no-timing", "--quiet")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "first" in res.stdout and "divergence" in res.stdout and "never differs" in res.stdout
    assert "optimistic" not in res.stderr  # one decode query groups with no other
    res = _cli("drift", model_dirs["llama"], *common, "--methods", "uniform", "--budgets", 4,
               "--generate", 4, "--phase", "both", "--no-timing", "-f", "csv")  # fmt: skip
    assert res.exit_code == 0, res.output
    header, row = res.stdout.splitlines()[:2]
    assert "first_divergence_mean" in header and row.startswith("uniform,4,ok,,4,")


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--generate", 0), "--generate must be a positive number of tokens; got 0."),
        (("--generate", -2), "--generate must be a positive number of tokens; got -2."),
        (("--phase", "decode"), "--phase goes with --generate"),
        (("--generate", 4, "--phase", "later"), "--phase must be one of decode, prefill, both"),
    ],
)
def test_cli_generate_errors_are_one_line(model_dirs, text_file, extra, message):
    res = _cli("drift", model_dirs["llama"], "--text", text_file, "--tokens", N, *extra)
    assert res.exit_code == 2 and message in res.stderr
    assert len([line for line in res.stderr.splitlines() if line.strip()]) == 1


def test_cli_generate_on_an_encoder_is_one_line(model_dirs, text_file):
    res = _cli("drift", model_dirs["bert"], "--text", text_file, "--tokens", N, "--generate", 4)
    assert res.exit_code == 2 and "is an encoder (no language-model head)" in res.stderr
    assert len([line for line in res.stderr.splitlines() if line.strip()]) == 1


def test_the_verdict_of_a_generation_judges_its_teacher_forced_kl(model_dirs, text_file):
    """Under a --generate table the verdict compares the generation's KL with the floor's: topk
    over every key is exact (KL 0), below the mean baseline's."""
    from kdecli.experiments.verdict import drift_verdict

    report = _drift(model_dirs["llama"], text_file, ["topk"], [N + T], chunks=1)
    assert report.floor is not None and report.floor.generation.kl.mean > 0
    verdict = drift_verdict(report)
    assert verdict.metric == "teacher-forced KL"
    assert not verdict.all_at_or_above_floor
    assert [best.method for best in verdict.below_floor] == ["topk"]
