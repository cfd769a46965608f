"""`kdecli report` and `kdecli plot` read every document kdecli writes: compare (JSON and JSONL),
merged shards, scale and drift.  Each is written by the CLI on a tiny input, then rendered in every
format its kind has (JSON reproducing the document's bytes and records), with `--columns`, and
drawn; what a kind cannot do is refused with a message that says what it can."""

import importlib.util
import io
import json

import pytest
from rich.cells import cell_len
from typer.testing import CliRunner

from kdecli.cli import app
from kdecli.experiments.documents import load_any
from kdecli.experiments.views import REPORT_FORMATS, load_report
from tests._models import save_models, train_tokenizer, write_text

runner = CliRunner()
SPEC = "synthetic:n=64,d=8,b=1,h=2"
FAST = ("--seeds", 2, "--repeats", 1, "--warmup", 0, "--min-time", 0)
KINDS = ("compare.json", "compare.jsonl", "merged.json", "scale.json", "drift.json")
PNG = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args):
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """Every kind of document, written by the commands that write them (drift: when
    transformers is installed)."""
    folder = tmp_path_factory.mktemp("documents")
    compare = ("compare", SPEC, "--methods", "exact,mean,uniform", "--budgets", "4,8", *FAST)
    ok(*compare, "-f", "json", "-o", folder / "compare.json")
    ok(*compare, "-f", "jsonl", "-o", folder / "compare.jsonl")
    shards = [folder / f"shard{i}.jsonl" for i in range(2)]
    for i, shard in enumerate(shards):
        ok(*compare, "--num-shards", 2, "--shard-id", i, "-f", "jsonl", "-o", shard)
    ok("merge", *shards, "-o", folder / "merged.json", "--quiet")
    ok("scale", "synthetic:d=8", "--methods", "uniform,mean", "--budget", 4, "--n", "32,64",
       *FAST, "-f", "json", "-o", folder / "scale.json")  # fmt: skip
    paths = {name: folder / name for name in KINDS}
    if importlib.util.find_spec("transformers") is None:
        return paths
    text = write_text(folder)
    model = save_models(folder, train_tokenizer(text))["llama"]
    ok("drift", model, "--text", text, "--tokens", 16, "--chunks", 2, "--device", "cpu",
       "--methods", "exact,uniform", "--budgets", "4,8", *FAST[:6], "-f", "json",
       "-o", folder / "drift.json")  # fmt: skip
    return paths


def doc_of(docs, name):
    if not docs[name].exists():  # drift, without transformers
        pytest.skip("needs kdecli[hf] (transformers)")
    return docs[name]


def formats_of(path):
    return load_report(path)[1].formats


@pytest.mark.parametrize("name", KINDS)
def test_report_renders_every_kind_in_each_of_its_formats(docs, name):
    path = doc_of(docs, name)
    report, view = load_report(path)
    assert view.kind == name.split(".")[0].replace("merged", "compare")
    assert set(view.formats) >= {"table", "markdown", "csv", "json"}
    table = ok("report", path).stdout
    assert "method" in table.split("┡")[0] and "uniform" in table.split("┡")[1]
    markdown = ok("report", path, "-f", "markdown").stdout
    assert markdown.startswith("**") and "| method" in markdown and "|---" in markdown
    csv = ok("report", path, "-f", "csv").stdout.splitlines()
    assert csv[0].startswith("method,") and any(line.startswith("uniform,") for line in csv)


@pytest.mark.parametrize("name", KINDS)
def test_report_json_reproduces_the_document(docs, name, tmp_path):
    path = doc_of(docs, name)
    again = tmp_path / "again.json"
    ok("report", path, "-f", "json", "-o", again, "--quiet")
    first, second = load_any(path), load_any(again)
    assert type(first) is type(second) and first.to_dict() == second.to_dict()
    if path.suffix == ".json":  # what the command wrote, byte for byte
        assert again.read_bytes() == path.read_bytes()
    if "jsonl" in formats_of(path):
        lines = ok("report", path, "-f", "jsonl").stdout.splitlines()
        assert json.loads(lines[0])["type"] == "run"
        assert len([line for line in lines if '"type": "result"' in line]) == len(first.results)
        if path.suffix == ".jsonl":
            assert "\n".join(lines) + "\n" == path.read_text()


@pytest.mark.parametrize(
    ("name", "asked", "absent"),
    [
        ("compare.json", "method,budget,rel_frobenius", "speed-up"),
        ("merged.json", "method,status", "rel_spectral"),
        ("scale.json", "method,n,error", "speed-up"),
        ("drift.json", "method,budget,hidden_last", "KL"),
    ],
)
def test_columns_choose_the_table_of_every_kind(docs, name, asked, absent):
    path = doc_of(docs, name)
    header = ok("report", path, "--columns", asked).stdout.split("┡")[0]
    assert absent not in header and "method" in header
    assert "Not shown" not in ok("report", path, "--columns", asked).stdout
    res = invoke("report", path, "--columns", "method,speed")
    assert res.exit_code == 2 and "unknown column 'speed'" in res.stderr
    keys = load_report(path)[1].parse_columns("all")
    assert "choose from " + ", ".join(keys) in " ".join(res.stderr.split())


@pytest.mark.parametrize("name", ["scale.json", "drift.json"])
def test_scale_and_drift_tables_fit_the_width_and_say_what_they_left_out(docs, name):
    path = doc_of(docs, name)
    report, view = load_report(path)
    wide = view.render_text(report, "table", width=300)
    assert "Not shown" not in wide
    fits = max(cell_len(line) for line in wide.split("┏")[1].splitlines()) - 12  # not all of it
    text = view.render_text(report, "table", width=fits)
    table = text[text.index("┏") : text.index("Not shown")]
    assert max(cell_len(line) for line in table.splitlines()) <= fits
    assert f"Not shown at width {fits}:" in text and "…" not in text
    # narrower than the columns always shown: drawn whole past the edge, never cut
    narrow = view.render_text(report, "table", width=30)
    first = narrow.split("└")[0].splitlines()  # the main table, not the scale fits under it
    rows = [line for line in first if line.startswith("│") and "uniform" in line]
    assert rows and all(line.endswith("│") and " ok " in line for line in rows)
    assert len({cell_len(line) for line in rows}) == 1 and "…" not in narrow


@pytest.mark.parametrize("name", KINDS)
def test_plot_draws_every_kind(docs, name, tmp_path):
    pytest.importorskip("matplotlib")
    path = doc_of(docs, name)
    image = tmp_path / "x.png"
    res = ok("plot", path, "-o", image)
    assert f"Wrote {image}" in res.stderr
    assert image.read_bytes()[:8] == PNG and image.stat().st_size > 10_000


def test_plot_of_a_drift_document_by_layer_and_by_another_figure(docs, tmp_path):
    pytest.importorskip("matplotlib")
    path = doc_of(docs, "drift.json")
    ok("plot", path, "--x", "layer", "-o", tmp_path / "layer.svg")
    ok("plot", path, "--y", "top1", "-o", tmp_path / "top1.svg")
    assert (tmp_path / "layer.svg").read_text().count('id="patched') >= 1
    res = invoke("plot", path, "--y", "cosine", "-o", tmp_path / "x.png")
    assert res.exit_code == 2 and "no result with status ok has cosine" in res.stderr
    assert "--y kl" in res.stderr  # a next-token model's figure


def test_what_a_kind_cannot_do_is_refused_saying_what_it_can(docs, tmp_path):
    scale, compare = docs["scale.json"], docs["compare.json"]
    res = invoke("report", scale, "-f", "jsonl")
    assert res.exit_code == 2
    assert "a scale document is rendered as table, markdown, csv, json" in res.stderr
    res = invoke("report", scale, "--target-error", "0.5")
    assert res.exit_code == 2 and "this is a scale document" in res.stderr
    res = invoke("report", compare, scale, "-f", "csv")
    assert res.exit_code == 2 and "of kinds compare, scale" in res.stderr
    assert ok("report", compare, scale).stdout.count("uniform") > 2  # tables: one after another
    res = invoke("plot", compare, scale, "-o", tmp_path / "x.png")
    assert res.exit_code == 2 and "one kind together; got compare, scale" in res.stderr
    res = invoke("plot", scale, scale, "-o", tmp_path / "x.png")
    assert res.exit_code == 2 and "one scale document at a time" in res.stderr
    res = invoke("plot", compare, "--x", "n", "-o", tmp_path / "x.png")
    assert res.exit_code == 2 and "--x n draws one `kdecli scale" in res.stderr


def test_scale_and_drift_commands_refuse_unknown_columns_before_running(tmp_path):
    res = invoke("scale", "synthetic:d=8", "--n", "32,64", "--columns", "method,slope")
    assert res.exit_code == 2 and "unknown column 'slope'" in res.stderr
    assert "choose from method, n, time" in res.stderr
    res = invoke("drift", tmp_path / "no-model", "--text", tmp_path / "none.txt",
                 "--columns", "kl,drift")  # fmt: skip
    assert res.exit_code == 2 and "unknown column 'drift'" in res.stderr


def test_the_library_renders_a_document_as_the_command_does(docs):
    from kdecli.experiments.views import render_document

    path = docs["compare.json"]
    assert render_document(path, "markdown") == ok("report", path, "-f", "markdown").stdout
    assert "jsonl" in REPORT_FORMATS
    buffer = io.StringIO(render_document(docs["scale.json"], "csv"))
    assert buffer.readline().startswith("method,n,status")
