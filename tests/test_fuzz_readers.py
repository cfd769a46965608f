"""The readers against hostile files: ``report``, ``merge`` and ``plot`` on structurally mutated
documents, and compare on mutated captures.  Whatever a file holds, a reader ends with exit 0, 1 or
2 and, when it refuses, one line: never "unexpected", never a traceback, never a control byte
from the file on the terminal.

The mutations start from real documents (compare JSON and JSONL, scale) and a capture-shaped HDF5
file: keys dropped, values retyped (null, numbers, NaN and infinities, strings with escapes, deep
nesting), lines cut or repeated (a second run line), other encodings.  hypothesis draws them with
``derandomize=True`` and a fixed number of examples, so every run tries the same files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kdecli.cli import app

runner = CliRunner()
SYN = "synthetic:n=64,d=8,b=1,h=1"
FAST = ("--repeats", 1, "--warmup", 0, "--min-time", 0)
FUZZ = settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: the first failing file is shown
    report_multiple_bugs=False,
    suppress_health_check=list(HealthCheck),
)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def judged(res) -> None:
    """What every reader must do with any file."""
    assert res.exit_code in (0, 1, 2), (res.exit_code, res.output, res.exception)
    text = res.output
    assert "unexpected" not in text and "Traceback" not in text, text
    assert "\x1b" not in text, text


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, str]:
    """The documents the mutations start from, as text."""
    root = tmp_path_factory.mktemp("seeds")
    compare = ("compare", SYN, "--methods", "exact,uniform", "--budgets", "8,16", "--seeds", 2,
               *FAST, "-q")  # fmt: skip
    for fmt in ("json", "jsonl"):
        res = invoke(*compare, "--format", fmt, "-o", root / f"run.{fmt}")
        assert res.exit_code == 0, res.output
    res = invoke("scale", SYN, "--methods", "uniform", "--budget", 8, "--n", "32,64", *FAST, "-q",
                 "--format", "json", "-o", root / "scale.json")  # fmt: skip
    assert res.exit_code == 0, res.output
    return {name: (root / name).read_text() for name in ("run.json", "run.jsonl", "scale.json")}


# ---- mutations ---------------------------------------------------------------------------------

ODD = st.sampled_from(
    [None, 0, -1, 1.5, 10**30, math.nan, math.inf, -math.inf, True, "", "x", "\x1b[2J\x1b]0;t\x07",
     "[bold]x[/bold]", "é" * 300, [], [1, "a"], {}, {"a": None}]
)  # fmt: skip


# a value nested deeper than Python's parser follows: put in the text, json.dumps cannot write it
DEEP_MARK = "kdecli-fuzz-deep"
DEEP = "[" * 5000 + "0" + "]" * 5000


def _paths(value, prefix=()):
    """Every path into a parsed JSON value."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _mutate(doc, path, how: str, odd):
    if not path:
        return odd if how == "retype" else doc
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if how == "drop":
        if isinstance(parent, dict):
            del parent[last]
        else:
            parent.pop(last)
    elif how == "deep":
        parent[last] = DEEP_MARK
    else:
        parent[last] = odd
    return doc


@st.composite
def mutated_json(draw, text: str) -> str:
    doc = json.loads(text)
    paths = list(_paths(doc))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        how = draw(st.sampled_from(["drop", "retype", "retype", "deep"]))
        doc = _mutate(doc, path, how, draw(ODD))
    return json.dumps(doc).replace(json.dumps(DEEP_MARK), DEEP)


@st.composite
def mutated_jsonl(draw, text: str) -> str:
    lines = text.splitlines()
    index = draw(st.integers(0, len(lines) - 1))
    how = draw(st.sampled_from(["line", "second_run", "duplicate", "cut", "drop", "garbage"]))
    if how == "line":
        lines[index] = draw(mutated_json(lines[index]))
    elif how == "second_run":
        lines.insert(index + 1, lines[0])
    elif how == "duplicate":
        lines.insert(index, lines[index])
    elif how == "cut":
        return "\n".join(lines)[: draw(st.integers(0, len(text) - 1))]
    elif how == "drop":
        del lines[index]
    else:
        lines[index] = draw(st.sampled_from(["{", "[]", "null", '{"type": 5}', "\x1b[2J"]))
    return "\n".join(lines) + "\n"


def encoded(text: str, encoding: str) -> bytes:
    if encoding == "cut-utf8":
        return text.encode("utf-8")[:-1] + b"\xc3"
    return text.encode(encoding, errors="replace")


ENCODINGS = st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16", "latin-1", "utf-8-sig",
                             "cut-utf8"])  # fmt: skip


# ---- report, merge, plot -----------------------------------------------------------------------


def _read_all(tmp_path: Path, name: str, content: bytes, plot: bool) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    judged(invoke("report", path, "--columns", "all"))
    judged(invoke("report", path, "--format", "json"))
    judged(invoke("merge", path, "-q"))
    if plot:
        judged(invoke("plot", path, "-o", tmp_path / "out.png", "-q"))


@FUZZ
@given(data=st.data())
def test_report_and_merge_of_a_mutated_compare_document(seeds, tmp_path_factory, data):
    text = data.draw(mutated_json(seeds["run.json"]))
    content = encoded(text, data.draw(ENCODINGS))
    _read_all(tmp_path_factory.mktemp("json"), "run.json", content, plot=False)


@FUZZ
@given(data=st.data())
def test_report_and_merge_of_a_mutated_jsonl_stream(seeds, tmp_path_factory, data):
    text = data.draw(mutated_jsonl(seeds["run.jsonl"]))
    content = encoded(text, data.draw(ENCODINGS))
    _read_all(tmp_path_factory.mktemp("jsonl"), "run.jsonl", content, plot=False)


@FUZZ
@given(data=st.data())
def test_report_of_a_mutated_scale_document(seeds, tmp_path_factory, data):
    text = data.draw(mutated_json(seeds["scale.json"]))
    _read_all(tmp_path_factory.mktemp("scale"), "scale.json", text.encode(), plot=False)


@settings(FUZZ, max_examples=8)
@given(data=st.data())
def test_plot_of_mutated_documents(seeds, tmp_path_factory, data):
    name = data.draw(st.sampled_from(["run.json", "run.jsonl", "scale.json"]))
    strategy = mutated_jsonl if name.endswith("jsonl") else mutated_json
    text = data.draw(strategy(seeds[name]))
    root = tmp_path_factory.mktemp("plot")
    (root / name).write_bytes(encoded(text, data.draw(ENCODINGS)))
    judged(invoke("plot", root / name, "-o", root / "out.png", "-q"))


# ---- capture files -----------------------------------------------------------------------------

ATTRIBUTE = st.sampled_from(
    [None, True, False, 0, 1, 2, -1, 0.5, math.nan, "no", "false", b"false", "abc", "",
     np.array([1, 0]), np.array([], dtype=np.int64), np.float32(0.25), "\x1b[2J"]
)  # fmt: skip


@settings(FUZZ, max_examples=30)
@given(
    causal=ATTRIBUTE,
    layer=ATTRIBUTE,
    scale=ATTRIBUTE,
    drop=st.sampled_from([None, "q", "k", "v"]),
    shape=st.sampled_from([(1, 2, 8, 4), (2, 8, 4), (8, 4), (8,), (1, 2, 0, 4), (1, 3, 8, 4)]),
    dtype=st.sampled_from(["f4", "f2", "i4", "S3"]),
)
def test_compare_of_a_mutated_capture(tmp_path_factory, causal, layer, scale, drop, shape, dtype):
    path = tmp_path_factory.mktemp("capture") / "qkv.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["kdecli_capture"] = 1
        group = f.create_group("layer0")
        for name in "qkv":
            if name == drop:
                continue
            values = rng.standard_normal((1, 2, 8, 4) if name == "q" else shape)
            group[name] = (
                values.astype("f4").astype(dtype) if dtype != "S3" else values.astype(dtype)
            )
        for key, value in (("causal", causal), ("layer", layer), ("scale", scale)):
            if value is not None:
                group.attrs[key] = value
    for spec, extra in ((f"{path}:/layer0", ()), (str(path), ("--all-layers",))):
        judged(invoke("compare", spec, *extra, "--methods", "exact", *FAST, "-q"))
        judged(invoke("inspect", spec, *extra))
