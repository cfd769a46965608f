"""Trust under concurrency and hostile files (issue 27), one section per case of the issue:

1. two runs on one ``--resume`` file are serialised by its lock: every record once, none lost;
2. captures and ``-o`` files are written whole, under names that carry their writer, and what a
   killed writer left is removed by the next run; a device is never replaced;
3. a capture's ``causal`` and ``layer`` attributes are read strictly;
4. no code from a model folder runs, and nothing prompts;
5. strings from a file reach the terminal with their control characters escaped, cut in tables;
6. hostile documents end in one line (exit 2), never "unexpected";
7. the row-sampled reference draws its rows from the run's seed;
8. the smaller ones: a failed write names the file, files follow the umask, a cut line is
   reported, ``schema_version: true`` is no version.
"""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from _models import needs_hf
from filelock import FileLock
from typer.testing import CliRunner

from kdecli.cli import app
from kdecli.errors import InputError, RuntimeFailure, UsageError
from kdecli.experiments.compare.records import load_document
from kdecli.files import Output, remove_stale
from kdecli.masks import FULL
from kdecli.measure.target import Target
from kdecli.render.safe import printable
from kdecli.sources.registry import load_inputs
from kdecli.sources.synthetic import synthetic
from kdecli.sweeps.resume import ResumeFile

runner = CliRunner()
SYN = "synthetic:n=64,d=8,b=1,h=1"
FAST = ("--repeats", 1, "--warmup", 0, "--min-time", 0)
HOST = socket.gethostname()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def compare_args(*extra):
    return ("compare", SYN, "--methods", "exact,uniform", "--budgets", "8,16", "--seeds", 2, *FAST,
            *extra)  # fmt: skip


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def resumed(tmp_path) -> Path:
    """A finished resume file: its run line and 5 records (exact once, uniform 2 budgets × 2)."""
    path = tmp_path / "run.jsonl"
    res = invoke(*compare_args("-q", "--resume", path))
    assert res.exit_code == 0, res.output
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """A compare JSON document, parsed."""
    path = tmp_path_factory.mktemp("doc") / "a.json"
    res = invoke(*compare_args("-q", "--format", "json", "-o", path))
    assert res.exit_code == 0, res.output
    return json.loads(path.read_text())


def keys_of(path: Path) -> list[str]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [item["type"] for item in lines].count("run") == 1
    return [item["key"] for item in lines if item["type"] == "result"]


# ---- 1. one run at a time on a resume file -----------------------------------------------------


def test_a_second_open_names_the_process_that_holds_the_resume_file(resumed):
    grid = load_document(resumed).grid
    waited = []
    with ResumeFile.open(resumed, grid):
        with pytest.raises(RuntimeFailure) as refused:
            ResumeFile.open(resumed, grid, wait=0)
        with pytest.raises(RuntimeFailure):
            ResumeFile.open(resumed, grid, wait=0.05, on_wait=waited.append)
    holder = f"process {os.getpid()} on host {HOST}"
    assert holder in refused.value.message and str(resumed) in refused.value.message
    assert len(waited) == 1 and holder in waited[0]
    with ResumeFile.open(resumed, grid, wait=0) as again:  # let go: the next run gets it
        assert again.done


def test_two_runs_on_one_resume_file_write_every_record_once(tmp_path):
    """Two shells (or SLURM jobs) given the same new --resume file: the second waits, saying for
    whom, then finds every record done; the file holds one run line and each record once."""
    path = tmp_path / "run.jsonl"
    lock = FileLock(str(path) + ".lock")
    lock.acquire()  # a first run that holds the file while the two start
    (tmp_path / "run.jsonl.lock.holder").write_text(f"{os.getpid()} {HOST}\n")
    command = [sys.executable, "-m", "kdecli", *map(str, compare_args("--resume", path))]
    runs = [
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for run in runs:  # each says whom it waits for before it does anything
            said = run.stderr.readline()
            assert f"waiting for process {os.getpid()} on host {HOST}" in said, said
    finally:
        lock.release()
    ends = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], ends
    keys = keys_of(path)
    assert len(keys) == len(set(keys)) == 5
    assert sum("Nothing left to run" in err for _, err in ends) == 1


def test_a_cut_line_is_cut_under_the_lock_and_only_the_cut_bytes(resumed):
    grid = load_document(resumed).grid
    lines = resumed.read_bytes().splitlines(keepends=True)
    whole, half = b"".join(lines[:3]), lines[3][:20]
    resumed.write_bytes(whole + half)
    with ResumeFile.open(resumed, grid) as resume:
        assert resume.dropped_partial
        resume.append(lines[3].decode().rstrip("\n"))
    assert resumed.read_bytes() == whole + lines[3]
    # a writer that took no lock (an older kdecli) wrote after the read: nothing of it is cut
    resumed.write_bytes(whole + half)
    with ResumeFile.open(resumed, grid) as resume:
        with open(resumed, "ab") as other:
            other.write(lines[3][20:])
        with pytest.raises(RuntimeFailure, match="changed while"):
            resume.append(lines[4].decode().rstrip("\n"))
    assert resumed.read_bytes() == whole + lines[3]


# ---- 2. written whole, under names that carry the writer ---------------------------------------


def test_output_temporaries_carry_their_writer_and_a_dead_writers_are_removed(tmp_path):
    target = tmp_path / "out.json"
    dead, live = dead_pid(), os.getppid()
    stale = tmp_path / f".out.json.{dead}@{HOST}.k3j9x0aq.tmp"
    alive = tmp_path / f".out.json.{live}@{HOST}.a1b2c3d4.tmp"
    elsewhere = tmp_path / f".out.json.{dead}@another.host.example.z9y8x7w6.tmp"
    unrelated = tmp_path / f".other.json.{dead}@{HOST}.k3j9x0aq.tmp"
    for path in (stale, alive, elsewhere, unrelated):
        path.write_text("half")
    with Output(target) as output:
        output.write("{}\n")
        assert output._tmp is not None
        assert Path(output._tmp).name.startswith(f".out.json.{os.getpid()}@{HOST}.")
    assert target.read_text() == "{}\n"
    assert not stale.exists() and alive.exists() and elsewhere.exists() and unrelated.exists()
    assert remove_stale(target) == []


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_output_files_follow_the_umask_and_keep_a_replaced_files_mode(tmp_path, mask):
    target = tmp_path / "out.json"
    previous = os.umask(mask)
    try:
        with Output(target) as output:
            output.write("{}\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    target.chmod(0o640)
    with Output(target) as output:
        output.write("[]\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


# ---- 3. capture attributes read strictly -------------------------------------------------------


def _capture_like(path: Path, **attrs) -> Path:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        group = f.create_group("layer0")
        for name in "qkv":
            group[name] = rng.standard_normal((1, 2, 8, 4)).astype(np.float32)
        group.attrs.update(attrs)
    return path


@pytest.mark.parametrize(
    "attrs",
    [
        {"causal": "no"},
        {"causal": "false"},
        {"causal": b"false"},
        {"causal": np.array([True, False])},
        {"causal": 2},
        {"causal": 0.5},
        {"layer": "abc"},
        {"layer": -1},
        {"layer": 1.5},
        {"layer": np.array([1, 2])},
    ],
    ids=repr,
)
def test_capture_attributes_that_are_no_flag_or_index_are_refused(tmp_path, attrs):
    path = _capture_like(tmp_path / "c.h5", **attrs)
    (name,) = attrs
    for spec, kwargs in ((f"{path}:/layer0", {}), (str(path), {"all_layers": True})):
        with pytest.raises(InputError, match=f"attribute `{name}` must be"):
            load_inputs(spec, **kwargs)
    res = invoke("inspect", f"{path}:/layer0")
    assert res.exit_code == 2 and "unexpected" not in res.stderr, res.output


@pytest.mark.parametrize("flag", [True, False, np.bool_(True), 0, 1, np.int64(1)])
def test_capture_attributes_as_capture_writes_them_are_read(tmp_path, flag):
    path = _capture_like(tmp_path / "c.h5", causal=flag, layer=np.int64(3))
    (qkv,) = load_inputs(f"{path}:/layer0")
    assert qkv.default_causal is bool(flag) and qkv.layer == 3


# ---- 4. no code from a model folder ------------------------------------------------------------


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BERT folder (safetensors and tokenizer) and a text to capture."""
    pytest.importorskip("transformers")
    from _models import build, train_tokenizer, write_text

    root = tmp_path_factory.mktemp("bert")
    text = write_text(root)
    folder = root / "bert"
    build("bert").save_pretrained(folder)
    train_tokenizer(text).save_pretrained(folder)
    return folder, text


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, to))


def _capture(folder: Path, text: Path, out: Path, **kwargs):
    return invoke("capture", folder, "--text", text, "-o", out, "--tokens", 16, "--chunks", 1,
                  "--device", "cpu", **kwargs)  # fmt: skip


@needs_hf
@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
def test_a_folder_that_names_its_own_code_is_refused_without_a_prompt(bert, tmp_path, config_file):
    folder = _copy(bert[0], tmp_path / "custom")
    marker = tmp_path / "ran"
    config = json.loads((folder / config_file).read_text())
    config["model_type"] = "kdecli-custom"
    config["auto_map"] = {"AutoConfig": "custom.Config", "AutoModel": "custom.Model",
                          "AutoTokenizer": ["custom.Tokenizer", None]}  # fmt: skip
    (folder / config_file).write_text(json.dumps(config))
    (folder / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import BertConfig as Config, BertModel as Model\n"
        "from transformers import PreTrainedTokenizerFast as Tokenizer\n"
    )
    res = _capture(folder, bert[1], tmp_path / "out.h5", input="y\n")
    assert res.exit_code == 2, res.output
    assert "auto_map" in res.stderr and "never runs code" in res.stderr
    assert "[y/N]" not in res.output and not marker.exists()


@needs_hf
def test_pickled_weights_are_refused(bert, tmp_path):
    from _models import build

    folder = _copy(bert[0], tmp_path / "pickled")
    (folder / "model.safetensors").unlink()
    torch.save(build("bert").state_dict(), folder / "pytorch_model.bin")
    res = _capture(folder, bert[1], tmp_path / "out.h5")
    assert res.exit_code == 2 and "pytorch_model.bin" in res.stderr, res.output
    assert "pickles" in res.stderr and not (tmp_path / "out.h5").exists()


@needs_hf
@pytest.mark.parametrize("config", ["{not json", "[1, 2]", "\xff\xfe", "[" * 5000])
def test_a_broken_config_is_one_line(bert, tmp_path, config):
    folder = _copy(bert[0], tmp_path / "broken")
    (folder / "config.json").write_bytes(config.encode("latin-1"))
    res = _capture(folder, bert[1], tmp_path / "out.h5")
    assert res.exit_code == 2 and "config.json" in res.stderr, res.output
    assert "unexpected" not in res.stderr


@needs_hf
@pytest.mark.parametrize(
    "content", [b"garbage" * 40, b"GGUF\x03\x00\x00\x00\x01", b""], ids=["garbage", "cut", "empty"]
)
def test_a_broken_gguf_file_is_one_line(tmp_path, content):
    from kdecli.hf.models import is_causal_lm, load_model

    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    for read in (is_causal_lm, load_model):
        try:
            read(path)
        except UsageError as exc:
            assert "model.gguf" in exc.message or "gguf" in exc.message
        else:
            raise AssertionError(f"{read.__name__} read a broken .gguf file")


# ---- 2 (captures) ------------------------------------------------------------------------------


@needs_hf
def test_capture_never_replaces_a_device_or_pipe(bert, tmp_path):
    fifo = tmp_path / "out.h5"
    os.mkfifo(fifo)
    res = _capture(*bert, fifo)
    assert res.exit_code == 2 and "not a regular file" in res.stderr, res.output
    assert stat.S_ISFIFO(fifo.stat().st_mode)


@needs_hf
def test_capture_removes_what_a_killed_capture_left_and_spares_a_running_ones(bert, tmp_path):
    out, dead = tmp_path / "qkv.h5", dead_pid()
    stale = tmp_path / f"qkv.h5.{dead}@{HOST}.incomplete"
    running = tmp_path / f"qkv.h5.{os.getppid()}@{HOST}.incomplete"
    elsewhere = tmp_path / f"qkv.h5.{dead}@another.example.incomplete"
    for path in (stale, running, elsewhere):
        path.write_bytes(b"half a capture")
    previous = os.umask(0o027)
    try:
        res = _capture(*bert, out)
    finally:
        os.umask(previous)
    assert res.exit_code == 0, res.output
    assert not stale.exists() and running.exists() and elsewhere.exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # the umask, as any file it writes


# ---- 5. escapes and long strings ---------------------------------------------------------------

HOSTILE = "\x1b[2J\x1b]0;owned\x07 [bold]loud[/bold] \x9b31m"


def _hostile(results: dict, tmp_path: Path, reason: str = HOSTILE) -> Path:
    doc = json.loads(json.dumps(results))
    failed = doc["results"][-1]
    failed["status"], failed["reason"] = "error", reason
    doc["input"]["source"] = "src\x1b[31m"
    failed["params"]["samples"] = "\x1b[5m"
    for record in doc["results"]:  # the footer names the device
        record["environment"]["device_name"] = "gpu\x1b]2;t\x07"
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_control_characters_from_a_file_are_escaped_and_markup_is_not_read(results, tmp_path, fmt):
    path = _hostile(results, tmp_path)
    res = invoke("report", path, "--format", fmt, "--columns", "all")
    assert res.exit_code == 0, res.output
    shown = res.stdout
    assert not any(c in shown for c in "\x1b\x07\x9b")
    assert "\\x1b[2J" in shown and "\\x1b]0;owned\\x07" in shown and "src\\x1b[31m" in shown
    assert "[bold]loud[/bold]" in shown and "gpu\\x1b]2;t\\x07" in shown


def test_the_markdown_compare_writes_is_escaped_too(results, tmp_path):
    """``compare --format markdown`` writes ``to_markdown`` straight to its output."""
    from kdecli.experiments.compare.records import load_document
    from kdecli.experiments.compare.report import to_markdown

    shown = to_markdown(load_document(_hostile(results, tmp_path)))
    assert not any(c in shown for c in "\x1b\x07\x9b")
    assert "gpu\\x1b]2;t\\x07" in shown


def test_a_huge_reason_is_cut_in_the_table_and_whole_in_the_json(results, tmp_path):
    reason = "why " * 250_000  # a megabyte
    path = _hostile(results, tmp_path, reason)
    res = invoke("report", path, "--columns", "all")
    assert res.exit_code == 0 and len(res.stdout) < 20_000 and "…" in res.stdout
    res = invoke("report", path, "--format", "json")
    assert json.loads(res.stdout)["results"][-1]["reason"] == reason


def test_printable_escapes_every_control_character_and_cuts():
    assert printable("a\x1bb\nc\td\x7f\x85") == "a\\x1bb\\nc\\td\\x7f\\x85"
    assert printable("µ±≈ é") == "µ±≈ é"  # printable text is left alone
    assert printable("x" * 500, 10) == "x" * 9 + "…"
    assert printable("\x1b" * 5, 10) == "\\x1b\\x1b\\…"  # an escape never makes it longer
    assert printable("x" * 500, None) == "x" * 500


def test_a_message_quoting_a_file_is_escaped(tmp_path):
    path = tmp_path / "evil\x1b]0;t\x07.json"
    path.write_text("{}")
    res = invoke("report", path)
    assert res.exit_code == 2 and "\x1b" not in res.stderr and "\\x1b" in res.stderr


# ---- 6. hostile documents: one line, exit 2 ----------------------------------------------------

DEEP = '{"schema_version": 2, "results": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.mark.parametrize("command", ["report", "merge", "plot"])
def test_a_deeply_nested_document_is_one_line(tmp_path, command):
    path = tmp_path / "deep.json"
    path.write_text(DEEP)
    res = invoke(command, path)
    assert res.exit_code == 2 and "nested too deeply" in res.stderr, res.output
    jsonl = tmp_path / "deep.jsonl"
    jsonl.write_text('{"type": "run", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    res = invoke(command, jsonl)
    assert res.exit_code == 2 and "unexpected" not in res.stderr, res.output


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_infinity_in_a_results_file_render_or_are_refused(results, tmp_path, value):
    doc = json.loads(json.dumps(results))
    doc["results"][-1]["errors"]["rel_frobenius"]["mean"] = value
    doc["results"][-1]["time"]["speedup"] = value
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(doc))  # NaN, Infinity: what Python's json writes
    for fmt in ("table", "markdown", "csv", "json"):
        res = invoke("report", path, "--format", fmt, "--columns", "all")
        assert res.exit_code in (0, 2) and "unexpected" not in res.stderr, res.output


@pytest.mark.parametrize(
    "change",
    [
        lambda doc: doc["results"][-1]["errors"]["rel_frobenius"].update(per_slice=["x"]),
        lambda doc: doc["results"][-1].update(key=["unhashable"]),
        lambda doc: doc["results"][-1].update(key={"a": 1}),
    ],
    ids=["per_slice", "key_list", "key_dict"],
)
def test_retyped_fields_are_one_line(results, tmp_path, change):
    doc = json.loads(json.dumps(results))
    change(doc)
    path = tmp_path / "retyped.json"
    path.write_text(json.dumps(doc))
    for command in ("report", "merge"):
        res = invoke(command, path)
        assert res.exit_code == 2 and "unexpected" not in res.stderr, res.output


@pytest.mark.parametrize(
    "content",
    [
        "é{}".encode("latin-1"),
        json.dumps({"document": "scale", "schema_version": 1}).encode(),
        json.dumps({"document": "drift", "schema_version": 1}).encode(),
        "\ufeff{}".encode("utf-16"),
    ],
    ids=["latin-1", "scale", "drift", "utf-16"],
)
def test_plot_of_an_unreadable_or_minimal_document_is_one_line(tmp_path, content):
    path = tmp_path / "doc.json"
    path.write_bytes(content)
    res = invoke("plot", path, "-o", tmp_path / "out.png")
    assert res.exit_code == 2 and "unexpected" not in res.stderr, res.output
    assert not (tmp_path / "out.png").exists()


# ---- 7. the row sample follows the run's seed --------------------------------------------------


def test_the_sampled_rows_follow_the_run_seed():
    qkv = synthetic("synthetic:n=200,d=8,b=1,h=1,seed=0")
    qkv = replace(qkv, q=qkv.q.double(), k=qkv.k.double(), v=qkv.v.double())

    def rows(seed: int) -> torch.Tensor:
        target = Target.compute(qkv, 0.3, FULL, 20, seed, bound=False)
        return target.exact.rows

    assert torch.equal(rows(0), rows(0))
    assert not torch.equal(rows(0), rows(1))
    assert len({tuple(rows(seed).tolist()) for seed in range(5)}) == 5


def test_seeds_change_the_measured_rows_end_to_end(tmp_path):
    """The same fixed input and a deterministic method (mean): only the sampled rows can make
    two seeds' errors differ."""
    rng = np.random.default_rng(0)
    path = tmp_path / "qkv.npz"
    np.savez(path, **{name: rng.standard_normal((256, 8)) for name in "qkv"})

    def measured(seed: int) -> tuple[float, int]:
        res = invoke("compare", path, "--methods", "mean", "--reference", "rows:16", "--seed",
                     seed, "--no-timing", "-q", "--format", "json")  # fmt: skip
        assert res.exit_code == 0, res.output
        doc = json.loads(res.stdout)
        return doc["results"][0]["errors"]["rel_frobenius"]["mean"], doc["reference"]["seed"]

    first, again, other = measured(0), measured(0), measured(1)
    assert first == again and first[1] == 0 and other[1] == 1
    assert first[0] != other[0]


# ---- 8. the smaller ones -----------------------------------------------------------------------


class _FullDisk(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_resume_names_the_file(resumed):
    grid = load_document(resumed).grid
    with pytest.raises(RuntimeFailure) as failed:
        with ResumeFile.open(resumed, grid) as resume:
            resume._stream = io.TextIOWrapper(io.BufferedWriter(_FullDisk()), encoding="utf-8")
            resume.append('{"type": "result"}')
    assert str(resumed) in failed.value.message and "No space left" in failed.value.message


def test_resume_files_follow_the_umask(tmp_path):
    path = tmp_path / "run.jsonl"
    previous = os.umask(0o027)
    try:
        assert invoke(*compare_args("-q", "--resume", path)).exit_code == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_report_and_merge_say_that_a_cut_last_line_was_left_out(resumed):
    text = resumed.read_text()
    resumed.write_text(text[: len(text) - 40])
    for command in ("report", "merge"):
        res = invoke(command, resumed)
        assert res.exit_code == 0, res.output
        assert "last line was cut short" in res.stderr and str(resumed) in res.stderr


@pytest.mark.parametrize("version", [True, 1.0, "1", None])
def test_a_schema_version_that_is_no_integer_is_refused(results, tmp_path, version):
    doc = dict(results, schema_version=version)
    path = tmp_path / "version.json"
    path.write_text(json.dumps(doc))
    res = invoke("report", path)
    assert res.exit_code == 2 and "schema_version" in res.stderr, res.output


@needs_hf
@pytest.mark.parametrize("broken", ["config", "pickles", "gguf-garbage", "gguf-cut"])
def test_drift_on_a_broken_model_is_one_line(bert, tmp_path, broken):
    from _models import build

    folder = _copy(bert[0], tmp_path / "model")
    model = folder
    if broken == "config":
        (folder / "config.json").write_text('{"model_type": "bert",')
    elif broken == "pickles":
        (folder / "model.safetensors").unlink()
        torch.save(build("bert").state_dict(), folder / "pytorch_model.bin")
    else:
        model = tmp_path / "model.gguf"
        model.write_bytes(b"junk" * 50 if broken == "gguf-garbage" else b"GGUF\x03\x00\x00")
    res = invoke("drift", model, "--text", bert[1], "--methods", "uniform", "--budgets", 8,
                 "--tokens", 16, "--device", "cpu")  # fmt: skip
    assert res.exit_code == 2 and "unexpected" not in res.stderr, res.output
    assert str(model) in res.stderr
