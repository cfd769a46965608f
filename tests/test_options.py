"""Options defined once: the same flag means the same thing in every command; process state."""

import os
import subprocess
import sys

import numpy as np
from typer.testing import CliRunner

from kdecli.cli import app
from kdecli.cli.options import INPUT, OPTIONS

runner = CliRunner()


def help_of(command):
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())


def test_input_options_are_offered_alike_by_every_command_that_reads_input():
    helps = {command: help_of(command) for command in ("approx", "compare", "inspect", "methods")}
    for name in INPUT.names:
        flag, text = OPTIONS[name].flags[0], OPTIONS[name].help
        for command, text_of_help in helps.items():
            if name == "all_layers" and command in ("inspect", "methods"):  # one input at a time
                continue
            assert flag in text_of_help and text in text_of_help, (command, flag)


def test_methods_input_takes_the_same_input_options(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name, shape in (("q", (40, 8)), ("k", (50, 8)), ("v", (50, 8))):
        paths += [f"--{name}", str(tmp_path / f"{name}.npy")]
        np.save(tmp_path / f"{name}.npy", rng.standard_normal(shape))
    res = runner.invoke(app, ["methods", "exact", *paths, "--causal"])  # the last 40 of 50
    assert res.exit_code == 0, res.stderr
    assert "on this input: can run on this input" in " ".join(res.stdout.split())
    res = runner.invoke(app, ["methods", "exact", *paths, "--causal", "--query-offset", "11"])
    assert res.exit_code == 0, res.stderr
    assert "the offset must be at most n_k - n_q = 10" in " ".join(res.stdout.split())
    res = runner.invoke(app, ["methods", "exact", *paths, "--causal", "--n", "40"])
    assert "on this input: can run on this input" in " ".join(res.stdout.split())


def run_python(code, **env):
    environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=600
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_importing_kdecli_changes_no_process_state():
    code = (
        "import os; before = dict(os.environ); import kdecli; "
        "kdecli.compare(kdecli.load_input('synthetic:n=16,d=4'), ['mean'], [], timing=False); "
        "print(dict(os.environ) == before, 'torch' in __import__('sys').modules)"
    )
    assert run_python(code) == "True True"


def test_the_command_and_the_library_call_ask_for_huge_pages():
    code = (
        "import os, sys; from kdecli import entry; sys.argv = ['kdecli', 'methods', 'exact']\n"
        "try:\n    entry.main()\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    )
    assert run_python(code).splitlines()[-1] == "1"
    assert run_python(code, THP_MEM_ALLOC_ENABLE="0").splitlines()[-1] == "0"  # the user's wins
    code = (
        "import kdecli, os; print(kdecli.enable_huge_pages(), os.environ['THP_MEM_ALLOC_ENABLE'])"
    )
    assert run_python(code) == "True 1"
