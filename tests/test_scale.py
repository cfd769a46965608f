"""`kdecli scale`: lengths, inputs at each length, the fitted exponents, the document and the CLI."""

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from kdecli.cli import app
from kdecli.errors import UsageError
from kdecli.experiments.scale.run import (
    ScaleReport,
    fit_exponent,
    fits_of,
    input_at,
    parse_lengths,
    scale,
)
from kdecli.measure.figures import ResultTime, TimeStat

runner = CliRunner()


def test_lengths_parse_with_suffixes_and_sort():
    assert parse_lengths("64k,4096,1M") == [4096, 65536, 1048576]
    for bad in ("4096", "4096,x", "0,4", "4096,4096", "12q,5"):
        with pytest.raises(UsageError):
            parse_lengths(bad)


def test_the_exponent_is_the_log_log_slope():
    assert fit_exponent([(n, 3.0 * n**1.5) for n in (1e3, 1e4, 1e5)]) == pytest.approx(1.5)
    assert fit_exponent([(4096, 2.0), (8192, 2.0)]) == pytest.approx(0.0)
    assert fit_exponent([(4096, 2.0)]) is None
    noisy = [
        (n, n**2 * (1.1 if i % 2 else 0.9)) for i, n in enumerate((2**12, 2**14, 2**16, 2**18))
    ]
    assert 1.9 < fit_exponent(noisy) < 2.1


def test_a_synthetic_input_is_drawn_at_each_length_and_a_file_cropped(tmp_path):
    assert input_at("synthetic:n=99,d=8,seed=3", 300).q.shape == (1, 1, 300, 8)
    path = tmp_path / "qkv.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path, q=rng.normal(size=(512, 8)), k=rng.normal(size=(512, 8)), v=rng.normal(size=(512, 8))
    )
    assert input_at(str(path), 256).k.shape[-2] == 256
    with pytest.raises(UsageError):
        input_at(str(path), 1024)


@pytest.fixture(scope="module")
def small_scale():
    return scale("synthetic:d=16", ["uniform", "mean"], 32, [256, 512, 1024], repeats=3, min_time=0)


def test_one_run_per_length_with_its_own_reference_and_exact_timing(small_scale):
    report = small_scale
    assert report.lengths == [256, 512, 1024] and len(report.runs) == 3
    for n, run in zip(report.lengths, report.runs):
        assert run.input.shape.n_q == n
        assert {r.method for r in run.results} == {"uniform", "mean"}
        assert all(r.time is not None and r.time.exact_s.median > 0 for r in run.results)
    assert set(report.fits) == {"uniform", "mean", "exact"}
    assert report.fits["exact"].points == 3 and math.isfinite(report.fits["exact"].exponent)


def test_the_document_round_trips(small_scale):
    doc = json.loads(json.dumps(small_scale.to_dict()))
    again = ScaleReport.from_dict(doc)
    assert again.lengths == small_scale.lengths and again.fits == small_scale.fits
    assert [len(r.results) for r in again.runs] == [len(r.results) for r in small_scale.runs]


def test_extrapolated_exact_times_are_left_out_of_the_exact_fit(small_scale):
    """An extrapolated time is quadratic by construction: fitting it returns the assumption."""
    report = ScaleReport.from_dict(small_scale.to_dict())
    last = report.runs[-1]
    for i, record in enumerate(last.results):
        exact = TimeStat(1000.0, 0.0, 3, extrapolated=True, extrapolated_rows=64)
        time = ResultTime(record.time.method_s, exact, None)
        last.results[i] = type(record)(**{**record.__dict__, "time": time})
    fits = fits_of(report)
    assert fits["exact"].points == 2 and fits["exact"].note == "measured lengths only"
    assert fits["exact"].exponent == pytest.approx(small_scale_exponent(small_scale), abs=1e-9)


def small_scale_exponent(report):
    times = [(n, run.results[0].time.exact_s.median) for n, run in zip(report.lengths, report.runs)]
    return fit_exponent(times[:2])


def test_the_cli_table_json_and_errors(tmp_path):
    out = tmp_path / "scale.json"
    args = ["scale", "synthetic:d=16", "--methods", "uniform", "--budget", "32", "--n", "256,512"]
    res = runner.invoke(
        app, [*args, "--repeats", "2", "--min-time", "0", "-f", "json", "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["kind"] == "scale" and doc["lengths"] == [256, 512]
    assert set(doc["fits"]) == {"uniform", "exact"}
    res = runner.invoke(app, [*args, "--repeats", "1", "--min-time", "0"])
    assert res.exit_code == 0, res.output
    assert "fitted exponent" in res.stdout and "512" in res.stdout
    res = runner.invoke(app, ["scale", "synthetic:d=16", "--n", "256"])
    assert res.exit_code == 2 and "at least two lengths" in res.output


def test_plot_draws_a_scale_document_on_log_axes(tmp_path, small_scale):
    pytest.importorskip("matplotlib")
    doc = tmp_path / "scale.json"
    doc.write_text(json.dumps(small_scale.to_dict(), indent=2))
    image = tmp_path / "scale.png"
    res = runner.invoke(app, ["plot", str(doc), "--x", "n", "-o", str(image)])
    assert res.exit_code == 0, res.output
    assert image.stat().st_size > 10_000 and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = runner.invoke(app, ["plot", str(doc), "-o", str(tmp_path / "again.svg")])  # detected
    assert res.exit_code == 0 and (tmp_path / "again.svg").exists()
