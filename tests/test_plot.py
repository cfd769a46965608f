"""`kdecli plot`: headless figures from recorded compare results, and refusals of anything else."""

import io
import json
import sys
import xml.etree.ElementTree as ElementTree

import pytest
from typer.testing import CliRunner

import kdecli
from kdecli.cli import app
from kdecli.errors import UsageError
from kdecli.experiments.compare.records import SCHEMA_VERSION
from kdecli.experiments.compare.report import render, to_json

pytest.importorskip("matplotlib")
from kdecli.experiments.compare.plot import check_plot_path, figure, load_results, plot_reports  # noqa: E402

runner = CliRunner()
SPEC = "synthetic:n=96,d=16,b=1,h=2,kind=clustered"
METHODS = ["exact", "mean", "kdeformer", "uniform"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Two recorded runs of one input: float32 as a JSON document, float64 as JSONL."""
    folder = tmp_path_factory.mktemp("results")
    qkv = kdecli.load_input(SPEC)
    paths = {}
    for dtype, fmt in (("float32", "json"), ("float64", "jsonl")):
        report = kdecli.compare(
            qkv, METHODS, [8, 16, 32], seeds=2, dtype=dtype, device="cpu", repeats=1, warmup=0
        )
        buffer = io.StringIO()
        render(report, fmt, buffer)
        paths[dtype] = folder / f"run-{dtype}.{fmt}"
        paths[dtype].write_text(buffer.getvalue())
    return paths


def method_lines(ax):
    return {line.get_label(): line for line in ax.get_lines() if line.get_gid() == "method"}


def test_budget_plot_has_one_line_per_budgeted_method(recorded):
    doc = load_results(recorded["float32"])
    fig = figure([doc], x="budget")
    (ax,) = fig.axes
    lines = method_lines(ax)
    assert set(lines) == {"kdeformer", "uniform"}  # exact: the reference; mean: the floor line
    assert list(lines["kdeformer"].get_xdata()) == [8, 16, 32]
    seeds = [
        r.error("rel_spectral") for r in doc.results if r.method == "kdeformer" and r.budget == 16
    ]
    assert len(seeds) == 2 and lines["kdeformer"].get_ydata()[1] == pytest.approx(sum(seeds) / 2)
    bands = [c for c in ax.collections if c.get_gid() == "band"]
    assert len(bands) == 2  # both methods are randomized: a min–max band each
    floors = {line.get_label(): line for line in ax.get_lines() if line.get_gid() == "floor"}
    mean_floor = doc.floors.mean_floor()
    assert any(lbl.startswith("mean-of-V floor") for lbl in floors)
    assert (
        next(v for k, v in floors.items() if k.startswith("mean-of-V")).get_ydata()[0] == mean_floor
    )
    assert ax.get_xscale() == "log"
    title = fig._suptitle.get_text()
    assert SPEC in title and "float32" in title and "cpu" in title and "scale 0.25" in title
    caption = next(t.get_text() for t in fig.texts if t.get_gid() == "caption")
    assert "min–max over seeds" in caption


def test_time_and_flops_panels(recorded):
    doc = load_results(recorded["float32"])
    fig = figure([doc], x="time,flops")
    time_ax, flops_ax = fig.axes[:2]
    assert set(method_lines(time_ax)) == {"kdeformer", "uniform", "mean"}
    assert method_lines(time_ax)["mean"].get_linestyle() == "None"  # a point, not a line
    exact_s = doc.results[0].time.exact_median
    refs = [line for line in time_ax.get_lines() if line.get_gid() == "reference"]
    assert len(refs) == 1 and refs[0].get_xdata()[0] == exact_s
    flops = sorted(r.flops for r in doc.results if r.method == "uniform" and r.seed == 0)
    assert sorted(method_lines(flops_ax)["uniform"].get_xdata()) == flops
    exact_flops = next(r.flops for r in doc.results if r.method == "exact")
    assert [
        line.get_xdata()[0] for line in flops_ax.get_lines() if line.get_gid() == "reference"
    ] == [exact_flops]


def test_several_files_are_labelled_by_device_and_dtype(recorded, tmp_path):
    docs = [load_results(recorded["float32"]), load_results(recorded["float64"])]
    fig = figure(docs, x="budget")
    labels = set(method_lines(fig.axes[0]))
    assert labels == {
        f"{m} · cpu {t}" for m in ("kdeformer", "uniform") for t in ("float32", "float64")
    }
    out = tmp_path / "both.png"
    res = runner.invoke(
        app,
        [
            "plot",
            str(recorded["float32"]),
            str(recorded["float64"]),
            "-o",
            str(out),
            "--x",
            "budget,time",
        ],
    )
    assert res.exit_code == 0, res.stderr
    assert out.read_bytes().startswith(PNG) and res.stdout == ""


def test_image_formats_are_valid(recorded, tmp_path):
    doc = load_results(recorded["float64"])  # the JSONL run
    assert doc.environment.dtype == "float64" and len(doc.results) == 1 + 1 + 2 * 3 * 2
    png = plot_reports([doc], tmp_path / "a.png")
    data = png.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000
    svg = plot_reports([doc], tmp_path / "a.svg", x="flops", y="rel_frobenius")
    assert ElementTree.parse(svg).getroot().tag.endswith("svg")
    pdf = plot_reports([doc], tmp_path / "a.PDF", x="time")
    assert pdf.read_bytes().startswith(b"%PDF")


def hand_doc(values_by_budget, floor=0.3):
    """A minimal result document: method `a` with the given per-seed errors at each budget."""
    results = [
        {
            "method": "a",
            "budget": budget,
            "seed": seed,
            "params": {},
            "status": "ok",
            "reason": None,
            "flops": 10.0 * budget,
            "time": None,
            "errors": {"rel_spectral": {"mean": value, "max": value, "per_slice": [value]}},
        }
        for budget, values in values_by_budget.items()
        for seed, value in enumerate(values)
    ]
    results.append(
        {
            "method": "b",
            "budget": 8,
            "seed": 0,
            "params": {},
            "status": "unsupported",
            "reason": "needs n_q == n_k",
            "errors": {},
            "flops": None,
            "time": None,
        }
    )
    return {
        "schema_version": 1,
        "environment": {"device": "cpu", "dtype": "float32"},
        "input": {
            "source": "hand",
            "shape": {"b": 1, "h": 1, "n_q": 8, "n_k": 64, "d": 4, "d_v": 4},
            "scale": 0.5,
            "causal": False,
        },
        "floors": {"mean": {"rel_spectral": {"mean": floor}}, "zero": {}},
        "results": results,
    }


def test_band_is_min_max_over_seeds_and_log_y_only_past_a_decade():
    fig = figure([hand_doc({8: [0.5, 0.7, 0.6], 16: [0.35, 0.45, 0.4]})])
    ax = fig.axes[0]
    (band,) = [c for c in ax.collections if c.get_gid() == "band"]
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(0.35) and max(ys) == pytest.approx(0.7)
    assert ax.get_yscale() == "linear"
    zero = [line for line in ax.get_lines() if line.get_label().startswith("zero output")]
    assert len(zero) == 1 and zero[0].get_ydata()[0] == 1.0  # 0.7 is within reach of 1
    caption = next(t.get_text() for t in fig.texts if t.get_gid() == "caption")
    assert "Not shown: b (unsupported)" in caption
    fig = figure([hand_doc({8: [0.3], 16: [0.01]})])  # far below 1: no zero-output line
    assert fig.axes[0].get_yscale() == "log"
    assert not [
        line for line in fig.axes[0].get_lines() if line.get_label().startswith("zero output")
    ]


def test_refusals_name_the_file_and_the_problem(tmp_path):
    cases = {
        "other.json": ('{"hello": 1}', "lacks schema_version, input, environment, floors, results"),
        "list.json": ("[1, 2]", "holds a JSON list"),
        "broken.json": ('{"results": [', "is not JSON (line 1"),
        "empty.json": ("", "is empty"),
        "table.csv": ("method,budget,seed\nkdeformer,8,0\n", "is the CSV of `kdecli compare`"),
        "bad.jsonl": (
            '{"type": "run", "schema_version": 1}\n{"type": "row"}\n',
            "line 2 is not a result",
        ),
        "inspect.json": (
            json.dumps({"report": "inspect", "schema_version": 1}),
            "`kdecli inspect` report",
        ),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(UsageError) as info:
            load_results(path)
        assert str(path) in info.value.message and message in info.value.message, name
    with pytest.raises(UsageError, match="no such file"):
        load_results(tmp_path / "absent.json")


def test_refusals_on_the_command_line(recorded, tmp_path):
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    res = runner.invoke(app, ["plot", str(other), "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and f"{other}: is not a kdecli result document" in res.stderr
    res = runner.invoke(app, ["plot", str(recorded["float32"]), "-o", str(tmp_path / "x.jpg")])
    assert res.exit_code == 2 and "x.jpg: cannot write a .jpg image" in res.stderr
    res = runner.invoke(
        app,
        [
            "plot",
            str(recorded["float32"]),
            "--y",
            "bound_normalized",
            "-o",
            str(tmp_path / "x.png"),
        ],
    )
    assert res.exit_code == 2 and "--bound" in res.stderr
    res = runner.invoke(
        app, ["plot", str(recorded["float32"]), "--x", "seconds", "-o", str(tmp_path / "x.png")]
    )
    assert res.exit_code == 2 and "--x must be one of budget, time, flops" in res.stderr
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.jpg").exists()


def test_default_output_path_is_next_to_the_results(recorded):
    res = runner.invoke(app, ["plot", str(recorded["float32"]), "--x", "flops"])
    assert res.exit_code == 0, res.stderr
    expected = recorded["float32"].with_name("run-float32-rel_spectral-vs-flops.png")
    assert expected.read_bytes().startswith(PNG) and f"Wrote {expected}" in res.stderr


def test_check_plot_path(tmp_path):
    assert check_plot_path(tmp_path / "fig.svg") == tmp_path / "fig.svg"
    for bad, message in (
        (tmp_path / "fig", "suffix-less"),
        (tmp_path / "fig.gif", ".gif image"),
        (tmp_path / "no" / "fig.png", "does not exist"),
    ):
        with pytest.raises(UsageError, match=message):
            check_plot_path(bad)


def test_missing_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    with pytest.raises(UsageError) as info:
        check_plot_path(tmp_path / "fig.png")
    assert "matplotlib" in info.value.message and info.value.hint == "pip install 'kdecli[plot]'"


def test_compare_plot_option_checks_before_and_draws_after(tmp_path):
    run = ["compare", "synthetic:n=64,d=8", "--methods", "mean,uniform", "--budgets", "8,16",
           "--seeds", "2", "--repeats", "1"]  # fmt: skip
    res = runner.invoke(app, [*run, "--plot", str(tmp_path / "c.bmp")])
    assert res.exit_code == 2 and "c.bmp" in res.stderr and res.stdout == ""
    out = tmp_path / "c.png"
    res = runner.invoke(app, [*run, "--plot", str(out), "--format", "json"])
    assert res.exit_code == 0, res.stderr
    assert out.read_bytes().startswith(PNG)
    assert json.loads(res.stdout)["schema_version"] == SCHEMA_VERSION


def test_plot_reports_accepts_a_report_in_memory(tmp_path):
    report = kdecli.compare(
        kdecli.load_input("synthetic:n=40,d=8"),
        ["uniform"],
        [4, 8],
        seeds=2,
        timing=False,
        device="cpu",
    )
    fig = figure([json.loads(to_json(report))])
    assert set(method_lines(fig.axes[0])) == {"uniform"}
    with pytest.raises(UsageError, match="no time"):
        figure([report.as_dict()], x="time")
