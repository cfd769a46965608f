"""Captures read layer by layer: each layer's scale and causal flag, one reference per layer,
records that carry their layer, a row per layer and a mean over layers, a plot per layer."""

import io
import json

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import kdecli
from kdecli.cli import app
from kdecli.errors import InputError, UsageError
from kdecli.experiments.compare.records import load_document
from kdecli.experiments.compare.report import render
from kdecli.masks import FULL, Causal
from kdecli.measure.reference import exact_attention
from kdecli.sources import load_inputs

runner = CliRunner()
SCALES = {0: 0.5, 1: 0.25, 2: 0.125}  # per layer, as a model may scale (GPT-2 can)
CAUSAL = {0: False, 1: True, 2: True}


@pytest.fixture
def capture(tmp_path):
    """A file laid out as `kdecli capture` writes one: /layer{i} with q, k, v, o and attributes."""
    path = tmp_path / "capture.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["kdecli_capture"] = 1
        for layer in (2, 0, 1):  # stored out of order on purpose
            g = f.create_group(f"layer{layer}")
            q, k, v = (rng.standard_normal((2, 2, 48, 8)).astype(np.float32) for _ in range(3))
            g["q"], g["k"], g["v"] = q, k, v
            o = exact_attention(*(torch.from_numpy(t).double() for t in (q, k, v)), SCALES[layer],
                                mask=Causal(0) if CAUSAL[layer] else FULL)  # fmt: skip
            g["o"] = o.float().numpy()
            g.attrs.update(layer=layer, scale=SCALES[layer], causal=CAUSAL[layer])
    return path


def test_layers_come_in_order_with_their_scale_and_causal_flag(capture):
    layers = load_inputs(f"{capture}:/layer*")
    assert [x.layer for x in layers] == [0, 1, 2]
    assert [x.default_scale for x in layers] == [SCALES[i] for i in range(3)]
    assert [x.causal() for x in layers] == [CAUSAL[i] for i in range(3)]
    assert [x.causal(False) for x in layers] == [False] * 3  # --no-causal still wins
    assert [x.layer for x in load_inputs(str(capture), all_layers=True)] == [0, 1, 2]
    assert [x.layer for x in load_inputs(f"{capture}:/layer[12]")] == [1, 2]
    with pytest.raises(InputError, match="no group matching '/block\\*'"):
        load_inputs(f"{capture}:/block*")
    with pytest.raises(InputError, match="holds 3 layers") as info:
        load_inputs(str(capture))  # the file alone: which layer?
    assert "--all-layers" in info.value.hint
    with pytest.raises(UsageError, match="--all-layers reads every layer of a capture"):
        load_inputs("synthetic:n=16,d=4", all_layers=True)


def test_the_exact_reference_reproduces_each_layers_own_output(capture):
    """Each layer is run with its own scale and causal flag: its exact reference is `o`."""
    report = kdecli.compare_layers(load_inputs(f"{capture}:/layer*"), ["exact"], [], timing=False)
    assert [(x.layer, x.input.scale, x.input.causal) for x in report.layers] == [
        (i, SCALES[i], CAUSAL[i]) for i in range(3)
    ]
    assert all(r.error("rel_spectral") < 1e-6 for r in report.results)  # float32 exact vs float64
    (layer1,) = load_inputs(f"{capture}:/layer1")
    with h5py.File(capture) as f:
        o = torch.from_numpy(f["layer1/o"][()]).double()
    q, k, v = (t.double() for t in (layer1.q, layer1.k, layer1.v))
    again = exact_attention(q, k, v, layer1.scale(), mask=layer1.mask())
    assert torch.allclose(again, o, atol=1e-5)


def test_compare_all_layers_on_the_command_line(capture, tmp_path):
    out = tmp_path / "layers.jsonl"
    args = ["compare", str(capture), "--all-layers", "--methods", "mean,uniform,topk",
            "--budgets", "8,16", "--seeds", "2", "--no-timing"]  # fmt: skip
    res = runner.invoke(app, [*args, "-f", "jsonl", "-o", str(out)])
    assert res.exit_code == 0, res.stderr
    kinds = [json.loads(line)["type"] for line in out.read_text().splitlines()]
    assert kinds[0] == "run" and kinds.count("layer") == 3 and kinds[1] == "layer"
    report = load_document(out)
    assert [x.layer for x in report.layers] == [0, 1, 2]
    assert {r.layer for r in report.results} == {0, 1, 2}
    per_layer = len(report.results) // 3
    assert per_layer == 1 + 2 * 2 + 2  # mean, uniform at two budgets and two seeds, topk at two
    for record in report.results:  # each against its own layer's floor
        floor = report.floors_of(record.layer).mean_floor()
        if record.beats_mean_floor is not None:
            assert record.beats_mean_floor == (record.error("rel_spectral") < floor)
    buffer = io.StringIO()
    render(report, "table", buffer, width=200)
    table = buffer.getvalue()
    rows = [line.split("│")[1:4] for line in table.splitlines() if line.startswith("│")]
    rows = [[cell.strip() for cell in row] for row in rows]
    assert ["0", "uniform", "8"] in rows and ["2", "topk (oracle)", "16"] in rows
    assert ["all", "uniform", "8"] in rows and ["all", "topk (oracle)", "16"] in rows
    assert "3 layers: 0, 1, 2" in table and "by layer 0:" in table
    json_doc = runner.invoke(app, ["report", str(out), "-f", "json"]).stdout
    assert [x["layer"] for x in json.loads(json_doc)["layers"]] == [0, 1, 2]


def test_mean_over_layers_is_the_mean_of_each_layers_seed_mean(capture):
    from kdecli.experiments.compare.aggregate import aggregate, mean_over_layers

    report = kdecli.compare_layers(
        load_inputs(f"{capture}:/layer*"), ["uniform"], [8], seeds=3, timing=False
    )
    settings = aggregate(report.results)
    (mean,) = mean_over_layers(settings, lambda layer: report.floors_of(layer).mean_floor())
    per_layer = [s.error("rel_spectral") for s in settings]
    assert mean.layer == "all" and mean.error("rel_spectral") == pytest.approx(np.mean(per_layer))
    assert mean.errors["rel_spectral"].std == pytest.approx(np.std(per_layer, ddof=1))


def test_one_layer_has_no_mean_over_layers(capture):
    from kdecli.experiments.compare.report import render_text, table_rows

    one = kdecli.compare_layers(load_inputs(f"{capture}:/layer1"), ["uniform"], [8], seeds=1,
                                timing=False)  # fmt: skip
    assert [row.layer for row in table_rows(one)] == [1]  # no `all` row repeating it
    assert "Rows `all`" not in render_text(one, "table", width=200)
    two = kdecli.compare_layers(load_inputs(f"{capture}:/layer[01]"), ["uniform"], [8], seeds=1,
                                timing=False)  # fmt: skip
    assert [row.layer for row in table_rows(two)] == [0, 1, "all"]
    assert "Rows `all`" in render_text(two, "table", width=200)


def test_plot_error_per_layer(capture, tmp_path):
    pytest.importorskip("matplotlib")
    from kdecli.experiments.compare.plot import figure

    report = kdecli.compare_layers(
        load_inputs(f"{capture}:/layer*"), ["mean", "uniform"], [8, 16], seeds=2, timing=False
    )
    fig = figure([report], x="layer")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"uniform @ 8", "uniform @ 16", "mean-of-V floor"}
    assert list(lines["uniform @ 8"].get_xdata()) == [0, 1, 2]
    floors = [report.floors_of(i).mean_floor() for i in range(3)]
    assert list(lines["mean-of-V floor"].get_ydata()) == pytest.approx(floors)
    plain = kdecli.compare(kdecli.load_input("synthetic:n=16,d=4"), ["mean"], [], timing=False)
    with pytest.raises(UsageError, match="no result has a layer"):
        figure([plain], x="layer")
    saved = tmp_path / "layers.json"
    saved.write_text(json.dumps(report.to_dict()))
    res = runner.invoke(app, ["plot", str(saved), "--x", "layer", "-o", str(tmp_path / "l.png")])
    assert res.exit_code == 0, res.stderr
    res = runner.invoke(app, ["plot", str(saved), "--x", "layer,budget"])
    assert res.exit_code == 2 and "--x layer draws a panel of its own" in res.stderr
