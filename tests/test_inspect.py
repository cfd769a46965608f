"""`kdecli inspect`: statistics checked against inputs whose answers are known in closed form."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdecli.cli import app
from kdecli.errors import UsageError
from kdecli.experiments.inspect import EXP_LIMITS, inspect_input, top_keys
from kdecli.qkv import QKV

runner = CliRunner()


def qkv_of(q, k, v):
    as4 = [t if t.dim() == 4 else t[None, None] for t in (q, k, v)]
    return QKV(*as4, source="test")


def orthonormal_rows(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return basis[:n]


def test_uniform_attention_matches_closed_form():
    # Q = 0: every logit is 0, P = 1/n_k everywhere, O_i = mean of V for every query.
    b, h, n_q, n_k, d, d_v = 1, 2, 37, 150, 5, 7
    g = torch.Generator().manual_seed(1)
    k = torch.randn(b, h, n_k, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, n_k, d_v, generator=g, dtype=torch.float64) + 2.0
    q = torch.zeros(b, h, n_q, d, dtype=torch.float64)
    # a tiny memory budget forces 5 queries per chunk: the statistics must survive chunking
    doc = inspect_input(qkv_of(q, k, v), device="cpu", memory_bytes=3 * 8 * b * h * n_k * 5)
    assert top_keys(n_k) == 2  # ceil(1.5)
    assert doc["reference"]["log_n_k"] == pytest.approx(math.log(n_k), rel=1e-15)
    for s in doc["slices"]:
        vs = v[s["batch"], s["head"]]
        assert s["entropy"]["mean"] == pytest.approx(math.log(n_k), rel=1e-12)
        assert s["entropy"]["min"] == pytest.approx(math.log(n_k), rel=1e-12)
        assert s["top_mass"]["mean"] == pytest.approx(2 / n_k, rel=1e-12)
        assert s["top_mass"]["min"] == pytest.approx(2 / n_k, rel=1e-12)
        assert s["logits"] == {"min": 0.0, "max": 0.0, "max_abs": 0.0}
        assert s["q"] == {"frobenius": 0.0, "max_row_norm": 0.0}
        ks = k[s["batch"], s["head"]]
        assert s["k"]["frobenius"] == pytest.approx(float(ks.norm()), rel=1e-12)
        assert s["k"]["max_row_norm"] == pytest.approx(float(ks.norm(dim=-1).max()), rel=1e-12)
        # O = 1 v̄ᵀ (rank one): ‖O‖₂ = √n_q ‖v̄‖;  D⁻¹A = 11ᵀ/n_k: ‖D⁻¹A‖₂ = √(n_q/n_k)
        v_bar = vs.mean(0)
        assert s["output_norm"] == pytest.approx(math.sqrt(n_q) * float(v_bar.norm()), rel=1e-10)
        assert s["attention_norm"] == pytest.approx(math.sqrt(n_q / n_k), rel=1e-6)
        assert s["value_norm"] == pytest.approx(float(torch.linalg.matrix_norm(vs, 2)), rel=1e-12)
        expected_ratio = (
            math.sqrt(n_k) * float(v_bar.norm()) / float(torch.linalg.matrix_norm(vs, 2))
        )
        assert s["output_ratio"] == pytest.approx(expected_ratio, rel=1e-6)
        assert s["exp_overflow"] == {"float32": False, "bfloat16": False, "float16": False}
    assert doc["summary"]["entropy"]["mean"]["min"] == pytest.approx(math.log(n_k), rel=1e-12)
    assert doc["summary"]["exp_overflow"]["float16"] == 0
    assert doc["warnings"] == []  # V has a large mean: O is not small


def test_zero_mean_values_under_uniform_attention_warn_about_rel_spectral():
    n = 64
    g = torch.Generator().manual_seed(2)
    v = torch.randn(n, 6, generator=g, dtype=torch.float64)
    v -= v.mean(0)  # the exact output is (numerically) zero
    doc = inspect_input(
        qkv_of(torch.zeros(n, 4, dtype=torch.float64), torch.randn(n, 4, generator=g), v),
        device="cpu",
    )
    assert doc["slices"][0]["output_ratio"] < 1e-12
    assert len(doc["warnings"]) == 1 and "bound_normalized" in doc["warnings"][0]


def test_one_hot_attention_entropy_is_zero_and_top_mass_one():
    n, d = 13, 21
    rows = orthonormal_rows(
        n, d
    ).float()  # K = Q, orthonormal: logits s on the diagonal, 0 elsewhere
    v = torch.randn(n, 5, generator=torch.Generator().manual_seed(3))
    scale = 200.0
    doc = inspect_input(qkv_of(rows, rows, v), scale=scale, device="cpu")
    s = doc["slices"][0]
    assert s["entropy"]["mean"] < 1e-60 and s["entropy"]["min"] >= 0
    assert s["top_mass"]["min"] == pytest.approx(1.0, abs=1e-12)
    assert s["logits"]["max"] == pytest.approx(scale, rel=1e-6)
    assert abs(s["logits"]["min"]) < 1e-4  # float32 rows: orthogonal up to rounding
    assert s["output_ratio"] == pytest.approx(1.0, rel=1e-6)  # P ≈ I: O ≈ V, ‖D⁻¹A‖₂ ≈ 1
    assert s["exp_overflow"] == {"float32": True, "bfloat16": True, "float16": True}
    assert any("float32" in w and f"{EXP_LIMITS['float32']:.2f}" in w for w in doc["warnings"])
    assert doc["dtypes"] == {"q": "float32", "k": "float32", "v": "float32"}


def test_peaked_attention_matches_closed_form_entropy():
    # logits s on the diagonal and 0 elsewhere: p_ii = eˢ/Z, Z = eˢ + n − 1, H = log Z − s·eˢ/Z
    n, scale = 13, 2.0
    rows = orthonormal_rows(n, 21, seed=4)
    doc = inspect_input(
        qkv_of(rows, rows, torch.ones(n, 3, dtype=torch.float64)), scale=scale, device="cpu"
    )
    z = math.exp(scale) + n - 1
    entropy = math.log(z) - scale * math.exp(scale) / z
    s = doc["slices"][0]
    assert s["entropy"]["mean"] == pytest.approx(entropy, rel=1e-12)
    assert s["entropy"]["min"] == pytest.approx(entropy, rel=1e-12)
    assert s["top_mass"]["mean"] == pytest.approx(math.exp(scale) / z, rel=1e-12)
    assert s["exp_overflow"]["float16"] is False


def test_causal_logit_range_covers_visible_entries_only():
    q = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
    k = torch.tensor([[4.0], [3.0], [2.0], [1.0]], dtype=torch.float64)
    v = torch.ones(4, 2, dtype=torch.float64)
    full = inspect_input(qkv_of(q, k, v), scale=1.0, device="cpu")["slices"][0]
    causal = inspect_input(
        qkv_of(q, k, v), scale=1.0, causal=True, device="cpu", memory_bytes=3 * 8 * 4
    )["slices"][0]  # one query per chunk
    assert (full["logits"]["min"], full["logits"]["max"]) == (1.0, 16.0)
    assert (causal["logits"]["min"], causal["logits"]["max"]) == (4.0, 16.0)
    assert causal["entropy"]["min"] == 0.0  # the first query sees one key
    assert causal["top_mass"]["min"] < 1.0 and full["entropy"]["min"] > 0


def test_chunked_statistics_equal_one_chunk():
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 3, 47, 9, generator=g) * 2 for _ in range(2))
    v = torch.randn(2, 3, 47, 4, generator=g)
    one = inspect_input(qkv_of(q, k, v), device="cpu")
    many = inspect_input(qkv_of(q, k, v), device="cpu", memory_bytes=3 * 8 * 6 * 47 * 4)
    for a, b in zip(one["slices"], many["slices"]):
        for key in ("logits", "entropy", "top_mass"):
            for stat in a[key]:
                assert a[key][stat] == pytest.approx(b[key][stat], rel=1e-12, abs=1e-15)
        assert a["output_norm"] == pytest.approx(b["output_norm"], rel=1e-12)


def test_causal_queries_over_more_keys_sit_at_the_end_or_at_their_offset():
    """Two queries over four keys: by default at positions 2 and 3 (they see 3 and 4 keys);
    at offset 0, at positions 0 and 1 (1 and 2 keys)."""
    q = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    k = torch.tensor([[4.0], [3.0], [2.0], [1.0]], dtype=torch.float64)
    v = torch.ones(4, 2, dtype=torch.float64)
    last = inspect_input(qkv_of(q, k, v), scale=1.0, causal=True, device="cpu")
    first = inspect_input(qkv_of(q, k, v), scale=1.0, causal=True, query_offset=0, device="cpu")
    assert last["input"]["query_offset"] == 2 and "query_offset" not in first["input"]
    assert (last["slices"][0]["logits"]["min"], last["slices"][0]["logits"]["max"]) == (2.0, 8.0)
    assert (first["slices"][0]["logits"]["min"], first["slices"][0]["logits"]["max"]) == (4.0, 8.0)
    assert first["slices"][0]["entropy"]["min"] == 0.0 and last["slices"][0]["entropy"]["min"] > 0


def test_bad_requests_are_usage_errors():
    qkv = qkv_of(torch.randn(7, 3), torch.randn(5, 3), torch.randn(5, 2))
    with pytest.raises(UsageError, match="at most as many queries as keys"):
        inspect_input(qkv, causal=True, device="cpu")
    wide = qkv_of(torch.randn(5, 3), torch.randn(7, 3), torch.randn(7, 2))
    with pytest.raises(UsageError, match=r"--query-offset must be in 0\.\.2 .* got 3"):
        inspect_input(wide, causal=True, query_offset=3, device="cpu")
    with pytest.raises(UsageError, match="--scale must be a positive"):
        inspect_input(qkv, scale=-1.0, device="cpu")


def test_cli_json_on_stdout_and_warnings_on_stderr(tmp_path):
    n = 40
    v = np.random.default_rng(0).standard_normal((n, 6))
    path = tmp_path / "uniform.npz"
    np.savez(path, q=np.zeros((n, 4)), k=np.ones((n, 4)), v=v - v.mean(0))
    res = runner.invoke(app, ["inspect", str(path), "--format", "json"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["kind"] == "inspect" and doc["input"]["source"] == str(path)
    assert doc["slices"][0]["entropy"]["mean"] == pytest.approx(math.log(n), rel=1e-12)
    assert "Warning:" in res.stderr and "bound_normalized" in res.stderr
    quiet = runner.invoke(app, ["inspect", str(path), "--format", "json", "--quiet"])
    assert quiet.stderr == ""


def test_cli_table_and_output_file(tmp_path):
    spec = "synthetic:n=50,d=8,b=2,h=2"
    res = runner.invoke(app, ["inspect", spec, "--scale", "0.5", "--causal"])
    assert res.exit_code == 0, res.stderr
    assert "entropy mean / min" in res.stdout and "mean over slices" in res.stdout
    assert "b1 h1" in res.stdout and "scale=0.5" in res.stdout and "causal" in res.stdout
    out = tmp_path / "inspect.json"
    res = runner.invoke(app, ["inspect", spec, "--format", "json", "-o", str(out), "--n", "20"])
    assert res.exit_code == 0 and res.stdout == "" and f"Wrote {out}" in res.stderr
    doc = json.loads(out.read_text())
    assert doc["input"]["shape"]["n_q"] == 20 and len(doc["slices"]) == 4
    assert set(doc["summary"]["logits"]["max"]) == {"mean", "min", "max"}


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["inspect", "synthetic:n=9,d=3", "--format", "csv"],
            "--format must be one of table, json",
        ),
        (["inspect", "missing.npz"], "missing.npz: no such file"),
        (
            ["inspect", "synthetic:n=9,nq=5,d=3", "--causal", "--query-offset", "5"],
            "--query-offset must be in 0..4",
        ),
        (["inspect", "synthetic:n=9,d=3", "--query-offset", "1"], "add --causal"),
    ],
)
def test_cli_refusals(args, message):
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and message in res.stderr and res.stdout == ""
