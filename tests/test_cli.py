import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kdecli.cli import app
from kdecli.experiments.compare.records import SCHEMA_VERSION

runner = CliRunner()
SAMPLE = str(Path(__file__).resolve().parents[1] / "sample_data" / "glove_sample.npz")
SYN = "synthetic:n=97,nq=59,d=21,dv=13,b=2,h=2,kind=clustered"


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def test_approx_json_is_the_only_thing_on_stdout():
    res = invoke(
        "approx", SYN, "--method", "kdeformer", "--budget", 32, "--format", "json", "--repeats", 1
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema_version"] == SCHEMA_VERSION and doc["results"][0]["method"] == "kdeformer"
    assert doc["results"][0]["time"]["speedup"] > 0
    assert doc["environment"]["threads"] >= 1


def test_compare_table_on_sample_data_mentions_floors_and_params():
    res = invoke(
        "compare",
        SAMPLE,
        "--methods",
        "exact,kdeformer",
        "--budgets",
        "64,128",
        "--seeds",
        2,
        "--repeats",
        1,
        "--n",
        512,
        "--verbose",  # the resolved parameters
    )
    assert res.exit_code == 0, res.stderr
    out = res.stdout
    assert "kdeformer" in out and "floors: mean-of-V baseline" in out
    assert "scale=0.316228" in out  # the paper's 10^-1/2, stored in the sample file
    assert "block_size=64 samples=128" in out


def test_jsonl_streams_header_then_results(tmp_path):
    out = tmp_path / "r.jsonl"
    res = invoke(
        "compare",
        SYN,
        "--methods",
        "mean,kdeformer",
        "--budgets",
        "16,32",
        "--seeds",
        2,
        "--format",
        "jsonl",
        "--output",
        out,
        "--repeats",
        1,
    )
    assert res.exit_code == 0, res.stderr
    assert res.stdout == ""
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["type"] == "run" and "floors" in lines[0]
    assert [line["type"] for line in lines[1:]] == ["result"] * 5


def test_csv_is_flat(tmp_path):
    res = invoke(
        "compare",
        SYN,
        "--methods",
        "kdeformer",
        "--budgets",
        "16",
        "--seeds",
        3,
        "--format",
        "csv",
        "--no-timing",
    )
    assert res.exit_code == 0, res.stderr
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(rows) == 3 and {r["seed"] for r in rows} == {"0", "1", "2"}
    assert float(rows[0]["rel_spectral_mean"]) > 0


def test_params_override_budget_mapping():
    res = invoke(
        "approx",
        SYN,
        "--budget",
        32,
        "--param",
        "num_projs=3",
        "-p",
        "block_size=5",
        "--format",
        "json",
        "--no-timing",
    )
    assert res.exit_code == 0, res.stderr
    params = json.loads(res.stdout)["results"][0]["params"]
    assert params == {
        "block_size": 5,
        "samples": 32,
        "num_projs": 3,
        "pairing": "auto",
        "sampling": "value-norm",
        "causal_leaf": 32,
    }


@pytest.mark.parametrize(
    "args, code, message",
    [
        (("approx", "missing.npz"), 2, "missing.npz: no such file"),
        (("approx", SYN, "--method", "kdeformr"), 2, "Did you mean `kdeformer`"),
        (("approx", SYN, "--param", "sample=3"), 2, "Did you mean `samples`"),
        (("approx", SYN, "--param", "samples=0"), 2, "`samples` must be an integer in [1,"),
        (("approx", SYN, "--budget", 500), 2, "larger than the number of keys"),
        (("approx", SYN, "--format", "xml"), 2, "--format must be one of"),
        (("approx", SYN, "--dtype", "float8"), 2, "--dtype must be one of"),
        (("approx", SYN, "--output", "/no/such/dir/out.json"), 2, "does not exist"),
        (("compare", SYN, "--budgets", "8,x"), 2, "comma-separated list of integers"),
        (("approx", "synthetic:n=9,oops=1"), 2, "cannot read 'oops=1'"),
    ],
)
def test_errors_are_one_line_messages_with_exit_codes(args, code, message):
    res = invoke(*args)
    assert res.exit_code == code
    assert message in res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_bad_array_message_names_file_and_array(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, q=np.ones((4, 3)), k=np.ones((4, 3)), v=np.full((4, 2), np.nan))
    res = invoke("approx", path, "--budget", 2)
    assert res.exit_code == 2 and "bad.npz: V holds 8 NaN" in res.stderr


def test_debug_env_shows_traceback():
    res = invoke("approx", "missing.npz", env={"KDECLI_DEBUG": "1"})
    assert res.exit_code != 0 and res.exception is not None


def test_unwritable_output_is_refused(tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    res = invoke("approx", SYN, "--output", target)
    assert res.exit_code == 2 and "is a folder" in res.stderr


def test_methods_listing_json_and_reasons():
    res = invoke("methods", "--format", "json")
    assert res.exit_code == 0
    names = [m["name"] for m in json.loads(res.stdout)]
    assert {"exact", "mean", "kdeformer"} <= set(names)
    res = invoke(
        "methods", "kdeformer", "--input", "synthetic:n=64,d=8", "--causal", "--format", "json"
    )
    entry = json.loads(res.stdout)
    assert entry["params_at_budget"]["samples"] == 256
    assert entry["causal_mode"] == "decomposition" and entry["reasons"] == []
    res = invoke("methods", "kdeformer", "--input", "synthetic:n=64,d=8", "--format", "json")
    assert json.loads(res.stdout)["reasons"] == []
    res = invoke("methods", "kdeformer")
    assert "block_size" in res.stdout and "value-norm" in res.stdout
    assert invoke("methods", "nope").exit_code == 2


def test_python_dash_m_and_console_script_work():
    res = subprocess.run(
        [sys.executable, "-m", "kdecli", "methods", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0 and json.loads(res.stdout)


def test_methods_and_commands_are_listed_in_their_documented_order():
    from kdecli.methods import method_names

    assert method_names() == [
        "exact", "mean", "kdeformer", "performer", "reformer", "scatterbrain",
        "hyperattention", "thinformer", "nystromformer", "uniform", "streaming", "quest",
        "magicpig", "h2o", "snapkv", "blocktopk", "vertical_slash", "xattention",
        "flexprefill", "topk", "rankk", "topk_pages", "topk_tiles",
    ]  # fmt: skip
    commands = [c.name for c in app.registered_commands]
    assert commands == [
        "approx",
        "compare",
        "methods",
        "inspect",
        "plot",
        "report",
        "merge",
        "capture",
        "drift",
        "scale",
        "download-glove",
    ]
