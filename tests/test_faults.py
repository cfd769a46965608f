"""Lose nothing: outputs written whole, signals, full disks, out of memory, failing timings,
markup in user text, closed pipes.  Each test injects one fault and checks what is left."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import kdecli
from kdecli.cli import app
from kdecli.experiments.compare.records import load_document
from kdecli.methods import registry
from kdecli.methods.base import AttentionMethod

runner = CliRunner()
SPEC = "synthetic:n=64,d=8"
ALLOCATION_FAILURE = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"
)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


class CpuOutOfMemory(AttentionMethod):
    """Fails as torch's CPU allocator does: a RuntimeError, not torch.OutOfMemoryError."""

    name, summary, paper = "cpu_oom", "test only", "test only"
    uses_budget = False

    def forward(self, q, k, v, scale, generator, mask):
        raise RuntimeError(ALLOCATION_FAILURE)


class FailsWhenTimed(AttentionMethod):
    """Right on its first call (the correctness pass), broken on the next (the timing pass)."""

    name, summary, paper = "fails_when_timed", "test only", "test only"
    uses_budget = False
    calls = 0

    def forward(self, q, k, v, scale, generator, mask):
        type(self).calls += 1
        if type(self).calls > 1:
            raise ValueError("timing broke")
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


@pytest.fixture
def faulty(monkeypatch):
    FailsWhenTimed.calls = 0
    monkeypatch.setitem(registry._REGISTRY, "cpu_oom", CpuOutOfMemory)
    monkeypatch.setitem(registry._REGISTRY, "fails_when_timed", FailsWhenTimed)


def test_cpu_out_of_memory_is_an_oom_record_and_the_others_continue(faulty):
    report = kdecli.compare(kdecli.load_input(SPEC), ["cpu_oom", "mean"], [], timing=False)
    oom, mean = report.results
    assert oom.status == "oom" and "can't allocate memory" in oom.reason
    assert "68719476736 bytes" in oom.reason  # the size that failed
    assert mean.status == "ok"


def test_a_failing_timing_pass_is_that_records_status(faulty):
    report = kdecli.compare(
        kdecli.load_input(SPEC), ["fails_when_timed", "mean"], [], repeats=1, warmup=0
    )
    timed, mean = report.results
    assert timed.status == "error" and "timing failed: ValueError: timing broke" in timed.reason
    assert timed.error("rel_spectral") < 1e-6  # its errors were measured and are kept
    assert mean.status == "ok" and mean.time.speedup is not None


def test_a_failing_exact_timing_leaves_every_record(monkeypatch):
    exact = registry._REGISTRY["exact"]

    class BrokenExact(exact):
        def forward(self, *args):
            raise RuntimeError(ALLOCATION_FAILURE)

    monkeypatch.setitem(registry._REGISTRY, "exact", BrokenExact)
    report = kdecli.compare(kdecli.load_input(SPEC), ["mean", "uniform"], [8], seeds=2, repeats=1)
    assert [r.status for r in report.results] == ["ok", "ok", "ok"]
    assert all(
        r.time.exact_s is None and "ran out of memory" in r.time.note for r in report.results
    )


@pytest.mark.parametrize(
    "bad",
    [
        ["--methods", "mean,kdeformr"],
        ["--methods", "kdeformer", "--budgets", "999"],
        ["--methods", "kdeformer", "--param", "samples=0"],
    ],
)
def test_a_usage_error_leaves_an_earlier_output_as_it_was(tmp_path, bad):
    out = tmp_path / "out.json"
    assert (
        invoke(
            "compare", SPEC, "--methods", "mean", "--no-timing", "-f", "json", "-o", out
        ).exit_code
        == 0
    )
    before = out.read_bytes()
    res = invoke("compare", SPEC, *bad, "--no-timing", "-f", "json", "-o", out)
    assert res.exit_code == 2
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary left


def test_a_full_disk_names_the_file(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    res = invoke(
        "compare", SPEC, "--methods", "mean", "--no-timing", "-f", "json", "-o", "/dev/full"
    )
    assert res.exit_code == 1
    assert "cannot write /dev/full: No space left on device." in res.stderr
    assert "unexpected" not in res.stderr


def test_user_text_is_never_markup(tmp_path):
    res = invoke("compare", SPEC, "--methods", "mean,[/x]")
    assert res.exit_code == 2 and "unknown method `[/x]`" in res.stderr
    res = invoke("compare", "in[/x].npz", "--methods", "mean")
    assert res.exit_code == 2 and "in[/x].npz" in res.stderr
    out = tmp_path / "out[bold].json"
    res = invoke("compare", SPEC, "--methods", "mean", "--no-timing", "-f", "json", "-o", out)
    assert res.exit_code == 0 and f"Wrote {out}." in res.stderr


# ---- in a child process: signals, pipes --------------------------------------------------------


def child(args, **kwargs):
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True,
               "env": {**os.environ, "COLUMNS": "200"}} | kwargs  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "kdecli", *map(str, args)], **options)


def wait_for_lines(folder: Path, lines: int, timeout: float = 600) -> None:
    """Until the hidden temporary file of a JSONL run holds ``lines`` lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tmp in folder.glob(".*.tmp"):
            if tmp.read_text().count("\n") >= lines:
                return
        time.sleep(0.05)
    raise AssertionError("the run wrote no records in time")


LONG_RUN = ["compare", "synthetic:n=512,d=16,b=2,h=2", "--methods", "mean,uniform,kdeformer",
            "--budgets", "8,16,32,64,128,256", "--seeds", "3", "--repeats", "2"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_between_records_and_keeps_what_finished(tmp_path, signum, code):
    out = tmp_path / "run.jsonl"
    out.write_text("previous\n")
    proc = child([*LONG_RUN, "-f", "jsonl", "-o", out])
    wait_for_lines(tmp_path, 3)  # the run line and two results
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "Stopping after the current record" in stderr
    kept = load_document(out)  # whole lines only, and a valid stream
    assert 2 <= len(kept.results) < 3 * 6 * 2 + 1
    assert f"Interrupted: kept {len(kept.results)} finished records in {out}." in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.jsonl"]


@pytest.mark.slow
def test_an_interrupted_json_run_writes_a_whole_document_of_what_finished(tmp_path):
    out = tmp_path / "run.json"
    out.write_text("previous")
    heavy = ["compare", "synthetic:n=4096,d=32,b=2,h=2", "--methods", "mean,uniform,kdeformer,reformer",
             "--budgets", "8,16,32,64,128,256,512", "--seeds", "3", "--repeats", "2"]  # fmt: skip
    proc = child([*heavy, "-f", "json", "-o", out])
    time.sleep(8)
    if proc.poll() is not None:
        pytest.skip("the run finished before the signal")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    if "kept 0 finished records" in stderr:  # stopped before the first record: untouched
        assert out.read_text() == "previous"
    else:  # a valid document of what finished, which says it was interrupted
        doc = json.loads(out.read_text())
        assert doc["interrupted"] is True and doc["results"]
        assert f"Interrupted: kept {len(doc['results'])} finished records in {out}." in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "Interrupted."),
                                                (signal.SIGTERM, 143, "Terminated.")])  # fmt: skip
def test_a_signal_during_start_up_is_one_line(signum, code, word):
    proc = child(["methods"])
    time.sleep(0.15)  # inside the imports (Typer's parsing has a test of its own, below)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=600)
    if proc.returncode == 0:
        pytest.skip("the command finished before the signal arrived")
    if proc.returncode == -signum:  # a very slow machine: Python itself had not started yet
        pytest.skip("the signal arrived before the interpreter was running")
    assert proc.returncode == code and stderr.strip() == word, stderr


# The entry point, with a signal sent to itself while Typer parses the command line.
SIGNAL_IN_PARSING = """
import os, signal, sys
import typer.core
from kdecli import entry

parse = typer.core.TyperGroup.parse_args

def parse_and_signal(self, ctx, args):
    os.kill(os.getpid(), signal.{name})
    return parse(self, ctx, args)

typer.core.TyperGroup.parse_args = parse_and_signal
sys.argv = ["kdecli", "methods"]
entry.main()
"""


@pytest.mark.parametrize("name, code, word", [("SIGINT", 130, "Interrupted."),
                                              ("SIGTERM", 143, "Terminated.")])  # fmt: skip
def test_a_signal_while_typer_parses_is_one_line_and_its_own_code(name, code, word):
    # before the fix, Typer turned both into a silent exit 130
    run = subprocess.run([sys.executable, "-c", SIGNAL_IN_PARSING.format(name=name)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert (run.returncode, run.stderr.strip(), run.stdout) == (code, word, "")


def test_a_command_restores_the_signals_it_handles_itself():
    # in-process (no entry point), the application leaves the process's handlers alone
    before = signal.getsignal(signal.SIGTERM)
    assert CliRunner().invoke(app, ["methods", "exact"]).exit_code == 0
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly():
    # enough records that the reader closes while the run is still writing
    proc = child([*LONG_RUN[:2], "--methods", "mean,uniform,kdeformer", "--budgets",
                  "8,16,32,64,128,256", "--seeds", "5", "--no-timing", "-f", "jsonl"])  # fmt: skip
    proc.stdout.read(100)
    proc.stdout.close()  # like `| head -c 100`
    stderr = proc.stderr.read()
    proc.wait(timeout=600)
    assert stderr == "" and proc.returncode == 141, stderr


@pytest.mark.slow
def test_a_full_standard_output_is_named(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    with open("/dev/full", "w") as full:
        proc = child(["compare", SPEC, "--methods", "mean", "--no-timing", "-f", "json"],
                     stdout=full)  # fmt: skip
        _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1
    assert "cannot write standard output: No space left on device." in stderr


def test_a_plot_that_fails_half_way_leaves_the_earlier_image(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from kdecli.experiments.compare.plot import plot_reports

    report = kdecli.compare(kdecli.load_input(SPEC), ["uniform"], [4, 8], seeds=2, timing=False)
    image = tmp_path / "errors.png"
    plot_reports([report], image)
    before = image.read_bytes()

    def broken(self, fname, **kwargs):
        Path(fname).write_bytes(b"half a picture")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(Exception, match=f"cannot write {image}: No space left on device"):
        plot_reports([report], image)
    assert image.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["errors.png"]


def test_a_disk_that_fills_while_writing_leaves_the_earlier_file(tmp_path, monkeypatch):
    """The temporary file cannot be completed (as on a full filesystem): the target keeps its
    old content, the temporary is removed, and the message names the file."""
    out = tmp_path / "out.json"
    out.write_text("earlier results")
    real_fsync = os.fsync

    def full(fd):
        real_fsync(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    res = invoke("compare", SPEC, "--methods", "mean", "--no-timing", "-f", "json", "-o", out)
    assert res.exit_code == 1
    assert f"cannot write {out}: No space left on device." in res.stderr
    assert out.read_text() == "earlier results"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_download_glove_says_terminated_for_sigterm(monkeypatch):
    from kdecli.errors import Terminated
    from kdecli.sources import glove_cache

    def killed(*args, **kwargs):
        raise Terminated()

    monkeypatch.setattr(glove_cache, "download_glove", killed)
    res = invoke("download-glove", "--corpus", "6B", "--dim", "50")
    assert res.exit_code == 143 and res.stderr.startswith("Terminated. Any partial download")
