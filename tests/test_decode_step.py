"""A decode step split in two: the cache prepared once, then steps (kdecli.methods.decode); its
timing, with the preparation apart and amortised (kdecli.measure.timed); `scale --phase decode`."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from kdecli.cli.app import app
from kdecli.errors import UsageError
from kdecli.masks import FULL, Causal
from kdecli.measure.figures import ResultTime
from kdecli.measure.time_record import decode_time
from kdecli.measure.timed import DecodeTiming, TimingOptions, time_decode_step
from kdecli.measure.timing import Timing
from kdecli.methods import get_method_class, make_method, method_names
from kdecli.methods.base import AttentionMethod
from kdecli.methods.decode import DecodeCache, decode_mask
from kdecli.qkv import QKV
from tests.conftest import gen, make_qkv

runner = CliRunner()
ALL = method_names()
N_K = 97


def build(name):
    cls = get_method_class(name)
    return make_method(name, 16 if cls.uses_budget else None)


def inputs(queries, dtype=torch.float64, seed=0):
    q, _, _ = make_qkv(2, 3, queries, queries, 21, 13, dtype=dtype, seed=seed + 1)
    _, k, v = make_qkv(2, 3, N_K, N_K, 21, 13, dtype=dtype, seed=seed)
    return q, k, v


@pytest.mark.parametrize("queries", [1, 5, 70], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("name", ALL)
def test_a_step_on_a_prepared_cache_is_the_forward(name, queries):
    """For every registered method: step(q, prepare(k, v)) equals the forward on the whole cache
    under Causal(n_k − M), with the same seed, to float rounding; the cache is left as it was."""
    method = build(name)
    q, k, v = inputs(queries)
    mask = Causal(N_K - queries)
    reasons = method.not_supported_reasons(q, k, v, mask)
    if reasons:
        pytest.skip(f"{name}: {'; '.join(reasons)}")
    expected = method(q, k, v, scale=0.3, mask=mask, generator=gen(7))
    cache = method.prepare_cache(k, v, mask=mask, scale=0.3, generator=gen(7))
    before = (k.clone(), v.clone())
    got = method.decode_step(q, cache)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])
    assert isinstance(cache, DecodeCache)


@pytest.mark.parametrize(
    "name",  # h2o, snapkv: no forward to compare with (tests/test_kvcache_prompt.py)
    [
        n
        for n in ALL
        if get_method_class(n).prepares_cache and not get_method_class(n).needs_prompt_queries
    ],
)
def test_a_prepared_step_of_one_query_reads_only_what_was_prepared(name):
    """The one-off work is really done once: with the cache's keys and values wiped after the
    preparation, a one-query step still gives the forward's output (it reads the prepared sums),
    in float32 too."""
    method = build(name)
    q, k, v = inputs(1, dtype=torch.float32)
    expected = method(q, k, v, scale=0.3, mask=decode_mask(N_K), generator=gen(3))
    cache = method.prepare_cache(k, v, scale=0.3, generator=gen(3))
    wiped = dataclasses.replace(
        cache, k=torch.full_like(k, float("nan")), v=torch.full_like(v, 1e9)
    )
    torch.testing.assert_close(method.decode_step(q, wiped), expected)


def test_performer_and_reformer_prepare_their_caches():
    assert get_method_class("performer").prepares_cache
    assert get_method_class("reformer").prepares_cache


def test_a_step_with_other_queries_than_prepared_for_is_refused():
    method = build("uniform")
    q, k, v = inputs(5)
    cache = method.prepare_cache(k, v, mask=Causal(N_K - 5), generator=gen(0))
    with pytest.raises(UsageError, match="prepared for 5 decode queries"):
        method.decode_step(q[..., :2, :], cache)
    full = method.prepare_cache(k, v, mask=FULL, generator=gen(0))  # cross-attention: any n_q
    assert method.decode_step(q[..., :2, :], full).shape == (2, 3, 2, 13)


def test_a_cache_defaults_to_one_query_at_the_last_position():
    cache = build("exact").prepare_cache(*inputs(1)[1:])
    assert cache.mask == Causal(N_K - 1) and cache.step_mask == FULL
    assert cache.scale == pytest.approx(21**-0.5)


class Clock:
    """A clock that moves only inside the fake method's calls."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@dataclasses.dataclass(frozen=True, eq=False)
class StagedCache(DecodeCache):
    pass


class Staged(AttentionMethod):
    """Not registered: a preparation that takes ``PREPARE`` seconds on the fake clock, a step
    that takes ``STEP``."""

    name = "staged"
    uses_budget = False
    supports_causal = True
    prepares_cache = True
    PREPARE, STEP = 0.5, 0.002

    def __init__(self, clock, prepares=True):
        super().__init__()
        self.clock = clock
        self.prepares_cache = prepares

    def prepare_decode(self, cache):
        self.clock.now += self.PREPARE
        return StagedCache.prepared(cache)

    def forward_decode(self, q, cache):
        self.clock.now += self.STEP
        return torch.zeros(*q.shape[:-1], cache.v.shape[-1])


def small_work(queries=1):
    q, k, v = inputs(queries, dtype=torch.float32)
    return QKV(q, k, v, "test")


@pytest.mark.parametrize("steps", [1, 64, 1000])
def test_the_preparation_is_timed_apart_and_amortised(steps):
    clock = Clock()
    options = TimingOptions(repeats=3, warmup=1, clock=clock, steps=steps)
    timed = time_decode_step(Staged(clock), small_work(), 0.3, decode_mask(N_K), 0, options)
    assert isinstance(timed, DecodeTiming)
    assert timed.prepare.median == pytest.approx(Staged.PREPARE)
    assert timed.step.median == pytest.approx(Staged.STEP)
    assert timed.steps == steps
    assert timed.amortised == pytest.approx(Staged.STEP + Staged.PREPARE / steps)
    exact = Timing(0.004, 0.0, 3, [0.004] * 3)
    record = decode_time(timed, exact)
    assert record.method_median == pytest.approx(Staged.STEP)
    assert record.prepare_s.median == pytest.approx(Staged.PREPARE)
    assert record.speedup == pytest.approx(0.004 / Staged.STEP)
    assert record.amortised_s == pytest.approx(Staged.STEP + Staged.PREPARE / steps)
    assert record.amortised_speedup == pytest.approx(0.004 / record.amortised_s)
    assert record.steps == steps


def test_a_method_without_a_preparation_has_no_prepare_time():
    clock = Clock()
    options = TimingOptions(repeats=2, warmup=0, clock=clock, steps=8)
    method = Staged(clock, prepares=False)
    timed = time_decode_step(method, small_work(), 0.3, decode_mask(N_K), 0, options)
    assert timed.prepare is None and timed.amortised == pytest.approx(Staged.STEP)
    record = decode_time(timed, None)
    assert record.prepare_s is None and record.amortised_speedup is None
    assert "prepare_s" not in record.to_dict() and record.to_dict()["steps"] == 8


def test_a_preparation_that_a_mask_skips_is_not_timed():
    """Reformer prepares the cache of a one-query step, not that of several queries (they run
    through the causal decomposition, whose pieces hash their own keys)."""
    method = build("reformer")
    options = TimingOptions(repeats=1, warmup=0, steps=8)
    one = time_decode_step(method, small_work(1), 0.3, decode_mask(N_K), 0, options)
    several = time_decode_step(method, small_work(5), 0.3, decode_mask(N_K, 5), 0, options)
    assert one.prepare is not None and several.prepare is None
    assert several.amortised == several.step.median


def test_a_failing_step_is_the_records_note():
    class Broken(Staged):
        def forward_decode(self, q, cache):
            raise RuntimeError("the step broke")

    timed = time_decode_step(
        Broken(Clock()), small_work(), 0.3, decode_mask(N_K), 0, TimingOptions(repeats=1)
    )
    record = decode_time(timed, None)
    assert record.method_s is None and "the step broke" in record.note


def test_old_result_times_still_load_and_decode_figures_round_trip():
    old = {"method_s": None, "exact_s": None, "speedup": None, "note": "why"}
    loaded = ResultTime.from_dict(old)
    assert loaded.prepare_s is None and loaded.steps is None and loaded.to_dict() == old
    clock = Clock()
    options = TimingOptions(repeats=2, warmup=0, clock=clock, steps=16)
    timed = time_decode_step(Staged(clock), small_work(), 0.3, decode_mask(N_K), 0, options)
    record = decode_time(timed, Timing(0.01, 0.0, 2, [0.01, 0.01]))
    again = ResultTime.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record


def scale_args(tmp_path, *extra):
    out = tmp_path / "scale.json"
    args = ["scale", "synthetic:d=16", "--methods", "performer,uniform", "--budget", "16"]
    args += ["--n", "256,512", "--repeats", "1", "--min-time", "0", "-f", "json", "-o", str(out)]
    return [*args, *extra], out


def test_scale_phase_decode_through_the_cli(tmp_path):
    args, out = scale_args(tmp_path, "--phase", "decode", "--queries", "2", "--steps", "16")
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["phase"] == "decode" and doc["queries"] == 2 and doc["steps"] == 16
    assert doc["lengths"] == [256, 512] and set(doc["fits"]) == {"performer", "uniform", "exact"}
    for n, run in zip(doc["lengths"], doc["runs"]):
        shape = run["input"]["shape"]
        assert (shape["n_q"], shape["n_k"]) == (2, n)
        for result in run["results"]:
            assert result["status"] == "ok" and result["phase"] == "decode"
            time = result["time"]
            assert time["steps"] == 16 and time["amortised_s"] >= time["method_s"]["median"]
            assert ("prepare_s" in time) == (result["method"] == "performer")
            expected = time["method_s"]["median"]
            if result["method"] == "performer":
                expected += time["prepare_s"]["median"] / 16
            assert time["amortised_s"] == pytest.approx(expected)
    table_args = [a for a in args if a not in ("-f", "json", "-o", str(out))]
    table = runner.invoke(app, [*table_args, "--columns", "all"])
    assert table.exit_code == 0, table.output
    assert "prepare" in table.stdout and "decode step" in table.stdout


def test_scale_prefill_documents_carry_their_phase(tmp_path):
    args, out = scale_args(tmp_path)
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["phase"] == "prefill" and "queries" not in doc and "steps" not in doc
    assert all("steps" not in r["time"] for run in doc["runs"] for r in run["results"])


def test_a_cache_that_cannot_fit_is_refused_in_one_line(tmp_path):
    args, out = scale_args(tmp_path, "--phase", "decode")
    args[args.index("256,512")] = f"256,{2**45}"
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert f"--n {2**45:,}: a decode cache" in res.stderr and "GiB available" in res.stderr
    assert len(res.stderr.strip().splitlines()) <= 2  # the line (and a hint at most)
    assert "Traceback" not in res.stderr and not out.exists()


def test_scale_measures_one_phase_at_a_time(tmp_path):
    args, out = scale_args(tmp_path, "--phase", "both")
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "one phase" in res.stderr and not out.exists()
