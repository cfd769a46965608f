"""The KV-cache methods that choose from the prompt's attention (h2o, snapkv): decode only, run as
``decode_step(q, prepare_cache(k, v, mask=, queries=prompt))``.  Their kept sets are checked
against independent float64 computations of the papers' rules; the contract battery's forward
checks (tests/test_contract.py) are re-stated here for the decode route."""

import json

import pytest
import torch
from typer.testing import CliRunner

import kdecli
from kdecli.cli import app
from kdecli.errors import UsageError
from kdecli.experiments.compare.run import compare
from kdecli.measure.reference import exact_attention
from kdecli.measure.timed import DecodeTiming, TimingOptions, time_decode_step
from kdecli.methods import make_method
from kdecli.methods.decode import decode_mask
from tests.conftest import make_qkv, rounding_bound

PROMPT_METHODS = ["h2o", "snapkv"]
SCALE = 0.3


def decode_inputs(n_k=120, steps=6, b=1, h=4, d=8, seed=0, spread=1.5):
    """A sequence of n_k positions: the prompt's queries, the decode queries (the last ``steps``)
    and the keys and values, with the decode mask."""
    q, k, v = make_qkv(b, h, n_k, n_k, d, seed=seed, spread=spread)
    prompt = n_k - steps
    return q[..., :prompt, :], q[..., prompt:, :], k, v, decode_mask(n_k, steps)


def decode(name, budget, prompt_q, q, k, v, mask, **params):
    method = make_method(name, budget, **params)
    cache = method.prepare_cache(k, v, mask=mask, scale=SCALE, queries=prompt_q)
    return method, cache, method.decode_step(q, cache)


def prompt_scores(prompt_q, k, first):
    """Column sums of the causal softmax of queries at positions first.. over the prompt's keys,
    in float64, one query at a time."""
    keys = k.shape[-2]
    total = torch.zeros(*k.shape[:-2], keys, dtype=torch.float64)
    for i in range(prompt_q.shape[-2]):
        seen = first + i + 1
        logits = SCALE * prompt_q[..., i : i + 1, :].double() @ k[..., :seen, :].double().mT
        total[..., :seen] += torch.softmax(logits, -1)[..., 0, :]
    return total


def slot_sets(index, valid):
    """{(batch, head): set of positions} of one step's read slots."""
    b, h = index.shape[:2]
    return {
        (i, j): {int(p) for p, ok in zip(index[i, j], valid[i, j]) if ok}
        for i in range(b)
        for j in range(h)
    }


# ---- exactness and causality ----------------------------------------------------------------


@pytest.mark.parametrize("gqa", ["per-head", "shared"])
@pytest.mark.parametrize("steps", [1, 6])
@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_exact_when_the_budget_covers_the_prefix(name, steps, gqa):
    prompt_q, q, k, v = decode_inputs(steps=steps)[:4]
    mask = decode_mask(k.shape[-2], steps)
    _, _, out = decode(name, k.shape[-2], prompt_q, q, k, v, mask, gqa=gqa, group=2)
    reference = exact_attention(q, k, v, SCALE, mask=mask)
    assert (out - reference).abs().max() <= rounding_bound(q, k, v, SCALE)
    _, _, smaller = decode(name, 24, prompt_q, q, k, v, mask, gqa=gqa, group=2)
    assert (smaller - reference).abs().max() > 1e-6  # below the cover it selects


@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_no_future_leak(name):
    """Perturbing the keys and values after a decode query's position leaves its output as it
    was: each step sees only its own prefix."""
    prompt_q, q, k, v, mask = decode_inputs(steps=8)
    *_, out = decode(name, 32, prompt_q, q, k, v, mask)
    first = k.shape[-2] - 8
    for i in range(7):
        k2, v2 = k.clone(), v.clone()
        k2[..., first + i + 1 :, :] += 3.0
        v2[..., first + i + 1 :, :] -= 5.0
        *_, moved = decode(name, 32, prompt_q, q, k2, v2, mask)
        assert torch.equal(moved[..., : i + 1, :], out[..., : i + 1, :]), i
        assert not torch.equal(moved[..., i + 1 :, :], out[..., i + 1 :, :])


def test_decode_error_falls_as_the_budget_grows():
    prompt_q, q, k, v, mask = decode_inputs(n_k=400, steps=8, seed=2, spread=2.0)
    reference = exact_attention(q, k, v, SCALE, mask=mask)
    for name in PROMPT_METHODS:
        errors = [
            float((decode(name, m, prompt_q, q, k, v, mask)[2] - reference).norm())
            for m in (16, 64, 256)
        ]
        assert errors[0] > errors[1] > errors[2], (name, errors)


# ---- h2o ------------------------------------------------------------------------------------


def test_h2o_first_kept_set_is_the_heavy_hitters_and_the_recent_window():
    prompt_q, q, k, v, mask = decode_inputs(n_k=90, steps=4, seed=1)
    prompt, budget, recent = 86, 20, 6
    method, cache, _ = decode("h2o", budget, prompt_q, q, k, v, mask, recent=recent)
    scores = prompt_scores(prompt_q, k[..., :prompt, :], first=0)
    first_step = next(method.steps(q, cache))
    for (i, j), read in slot_sets(first_step.index, first_step.valid).items():
        window = set(range(prompt + 1 - recent, prompt + 1))  # the query's own included
        others = sorted(range(prompt + 1 - recent), key=lambda p: -float(scores[i, j, p]))
        assert read == window | set(others[: budget - recent]), (i, j)


def test_h2o_never_reads_an_evicted_key_again():
    prompt_q, q, k, v, mask = decode_inputs(n_k=160, steps=24, h=2, seed=4)
    budget, recent = 16, 4
    method, cache, out = decode("h2o", budget, prompt_q, q, k, v, mask, recent=recent)
    steps = list(method.steps(q, cache))
    assert torch.equal(torch.cat([s.out for s in steps], -2).to(out.dtype), out)
    first = 160 - 24
    evicted: dict = {}
    before = slot_sets(cache.index, cache.valid)
    for t, step in enumerate(steps):
        p = first + t
        for head, read in slot_sets(step.index, step.valid).items():
            gone = evicted.setdefault(head, set(range(first)) - before[head])
            assert not (read & gone), (t, head, read & gone)
            assert len(read) == budget and p in read
            assert set(range(p + 1 - recent, p + 1)) <= read  # the recent window stays
            gone |= before[head] - read  # what the last step evicted
            before[head] = read
    # evictions happen: some key read at one step is missing from a later one
    assert any(gone for gone in evicted.values())


def test_h2o_step_evicts_the_lowest_accumulated_score():
    """Replaying the rule by hand in float64: after each step the key evicted is the lowest
    (prompt score + attention received in the steps so far) outside the next recent window."""
    prompt_q, q, k, v, mask = decode_inputs(n_k=70, steps=5, h=1, seed=6)
    budget, recent, first = 12, 3, 65
    method, cache, _ = decode("h2o", budget, prompt_q, q, k, v, mask, recent=recent)
    scores = torch.zeros(70, dtype=torch.float64)
    scores[:first] = prompt_scores(prompt_q, k[..., :first, :], first=0)[0, 0]
    steps = list(method.steps(q, cache))
    for t, step in enumerate(steps[:-1]):
        p = first + t
        read = sorted(slot_sets(step.index, step.valid)[(0, 0)])
        logits = SCALE * q[0, 0, t].double() @ k[0, 0, read].double().mT
        scores[read] += torch.softmax(logits, -1)
        candidates = [j for j in read if j < p + 2 - recent]
        lowest = min(candidates, key=lambda j: float(scores[j]))
        after = slot_sets(steps[t + 1].index, steps[t + 1].valid)[(0, 0)]
        assert after == (set(read) - {lowest}) | {p + 1}, t


# ---- snapkv ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gqa", ["per-head", "shared"])
def test_snapkv_keeps_the_window_and_the_top_pooled_votes(gqa):
    prompt_q, q, k, v, mask = decode_inputs(n_k=130, steps=4, seed=5)
    prompt, budget, obs, pool = 126, 40, 10, 5
    method, cache, _ = decode(
        "snapkv", budget, prompt_q, q, k, v, mask, obs=obs, pool=pool, gqa=gqa, group=2
    )
    prefix = prompt - obs
    vote = prompt_scores(prompt_q[..., prefix:, :], k[..., :prompt, :], first=prefix)
    vote = vote[..., :prefix]
    if gqa == "shared":
        vote = vote.view(1, 2, 2, prefix).sum(2).repeat_interleave(2, dim=1)
    half = pool // 2
    pooled = torch.stack(
        [vote[..., max(0, j - half) : j + half + 1].amax(-1) for j in range(prefix)], -1
    )
    kept = cache.kept
    for j in range(4):
        chosen = {int(p) for p in kept[0, j]}
        assert set(range(prefix, prompt)) <= chosen  # the observation window
        voted = chosen - set(range(prefix, prompt))
        assert len(voted) == budget - obs
        # the top pooled votes (max-pooling makes plateaus: ties may go either way)
        left = [float(pooled[0, j, p]) for p in range(prefix) if p not in voted]
        assert min(float(pooled[0, j, p]) for p in voted) >= max(left), j
        assert min(float(pooled[0, j, p]) for p in voted) > min(left)  # not a tie of all
    if gqa == "shared":
        assert torch.equal(kept[:, 0], kept[:, 1]) and torch.equal(kept[:, 2], kept[:, 3])


def test_snapkv_steps_read_the_kept_keys_and_the_decoded_ones():
    prompt_q, q, k, v, mask = decode_inputs(n_k=100, steps=5, h=1, seed=7)
    method, cache, out = decode("snapkv", 24, prompt_q, q, k, v, mask, obs=8)
    kept = [int(p) for p in cache.kept[0, 0]]
    for i in range(5):
        read = torch.tensor(kept + list(range(95, 96 + i)))
        logits = SCALE * q[0, 0, i].double() @ k[0, 0, read].double().mT
        expected = torch.softmax(logits, -1) @ v[0, 0, read].double()
        assert torch.allclose(out[0, 0, i], expected, atol=1e-12)
    assert method.keys_per_query(5, 100, mask) == 24 + 3


# ---- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_refused_in_prefill_and_without_the_prompt_queries(name):
    prompt_q, q, k, v, mask = decode_inputs()
    method = make_method(name, 16)
    (reason,) = method.phase_reasons("prefill")
    assert "decode phase only" in reason and "prompt's" in reason
    assert method.phase_reasons("decode") == []
    with pytest.raises(UsageError, match="needs the prompt's queries") as forward:
        method(q, k, v, mask=mask)
    with pytest.raises(UsageError, match="needs the prompt's queries") as prepare:
        method.prepare_cache(k, v, mask=mask)
    for refusal in (forward, prepare):
        assert "\n" not in str(refusal.value)
    (why,) = method.not_supported_reasons(q, k, v, mask)
    assert "prompt's queries" in why
    assert method.not_supported_reasons(q, k, v, mask, prompt_queries=prompt_q) == []
    short = prompt_q[..., 3:, :]  # an input whose first queries are missing
    (partial,) = method.not_supported_reasons(q, k, v, mask, prompt_queries=short)
    assert "every prompt position" in partial


@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_patch_refuses_them_in_one_line(name):
    from kdecli.hf.patching import prepare

    with pytest.raises(UsageError, match="compare --phase decode") as refusal:
        prepare(torch.nn.Linear(2, 2), name, 16)
    assert "\n" not in str(refusal.value)


# ---- the measurement route: compare, timing, the CLI -------------------------------------------


def _causal_input(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 4, n, 8, generator=g, dtype=torch.float64) * 1.5 for _ in range(3))
    return kdecli.QKV(q, k, v, "test", default_causal=True)


def test_compare_decode_measures_the_prepared_step_with_the_prompt():
    qkv = _causal_input()
    report = compare(
        qkv, PROMPT_METHODS, [16], phase="decode", queries=4, timing=False, scale=SCALE
    )
    mask = decode_mask(96, 4)
    reference = exact_attention(qkv.q[..., 92:, :], qkv.k, qkv.v, SCALE, mask=mask)
    for record in report.results:
        assert record.status == "ok", record.reason
        *_, out = decode(record.method, 16, qkv.q[..., :92, :], qkv.q[..., 92:, :], qkv.k,
                         qkv.v, mask)  # fmt: skip
        per_slice = (out - reference).flatten(2).norm(dim=-1) / reference.flatten(2).norm(dim=-1)
        measured = record.errors["rel_frobenius"].mean
        assert measured == pytest.approx(float(per_slice.mean()), rel=1e-4)


def test_decode_step_timing_prepares_with_the_prompt():
    qkv = _causal_input()
    work = qkv.last_queries(4)
    options = TimingOptions(repeats=1, warmup=0, clock=iter(range(10**6)).__next__)
    mask = decode_mask(96, 4)
    for name in PROMPT_METHODS:
        method = make_method(name, 16)
        timed = time_decode_step(method, work, SCALE, mask, 0, options, qkv.q[..., :92, :])
        assert isinstance(timed, DecodeTiming) and timed.prepare is not None
        refused = time_decode_step(method, work, SCALE, mask, 0, options)
        assert not isinstance(refused, DecodeTiming) and "prompt's queries" in refused.reason


def test_cli_decode_gives_ok_records_and_prefill_unsupported_ones(tmp_path):
    runner = CliRunner()
    source = "synthetic:n=96,d=8,b=1,h=2"
    for phase in ("decode", "prefill"):
        out = tmp_path / f"{phase}.json"
        res = runner.invoke(
            app,
            ["compare", source, "--methods", "h2o,snapkv", "--budgets", "16", "--phase", phase,
             "--queries", "4", "--no-timing", "-f", "json", "-o", str(out), "-q"],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        records = json.loads(out.read_text())["results"]
        assert sorted(r["method"] for r in records) == PROMPT_METHODS
        for record in records:
            if phase == "decode":
                assert record["status"] == "ok", record
            else:
                assert record["status"] == "unsupported"
                assert "decode phase only" in record["reason"]
