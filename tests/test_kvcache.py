"""The KV-cache methods (streaming, quest, the page oracle topk_pages): each reads the keys its
rule names, exactly, and reports the keys it read.  The contract battery (tests/test_contract.py)
runs them too; here is what is particular to each."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdecli
from kdecli.errors import UsageError
from kdecli.experiments.compare.run import compare
from kdecli.masks import FULL, Causal
from kdecli.measure.reference import exact_attention
from kdecli.methods import get_method_class, make_method, registry
from kdecli.methods.magicpig import collision_probability, collisions, simhash_codes
from kdecli.methods.quest import page_bounds
from kdecli.methods.selection import query_positions
from tests.conftest import gen, make_qkv, rounding_bound

KV_METHODS = ["streaming", "quest", "magicpig", "topk_pages"]
SELECTING = ["streaming", "quest", "topk_pages"]  # a key set fixed by the inputs (no draw)
MASKS = [FULL, Causal(0), Causal(40), Causal(96)]


def subset_attention(q, k, v, scale, kept):
    """Softmax attention of each query over its own key set, one query at a time in float64:
    ``kept[i]`` the positions query i reads (the same for every slice)."""
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for i, keys in enumerate(kept):
        index = torch.tensor(sorted(keys))
        logits = scale * q[..., i : i + 1, :].double() @ k[..., index, :].double().mT
        out[..., i, :] = (torch.softmax(logits, -1) @ v[..., index, :].double())[..., 0, :]
    return out


def n_q_of(mask, n_k):
    """Five queries after every key (FULL), a prefill (Causal(0)), the last queries otherwise."""
    if not mask.is_causal:
        return 5
    return n_k if mask.offset == 0 else n_k - mask.offset


@pytest.mark.parametrize("mask", MASKS, ids=str)
@pytest.mark.parametrize("name", KV_METHODS)
def test_exact_when_the_budget_covers_the_prefix(name, mask):
    n_k = 97
    q, k, v = make_qkv(2, 2, n_q_of(mask, n_k), n_k, 21, 13)
    # magicpig's budget m keeps m/2 keys exact (sinks and window), its candidates come on top
    covering = 2 * (n_k + 4) if name == "magicpig" else n_k
    out = make_method(name, covering)(q, k, v, scale=0.3, generator=gen(0), mask=mask)
    reference = exact_attention(q, k, v, 0.3, mask=mask)
    assert (out - reference).abs().max() <= rounding_bound(q, k, v, 0.3)


@pytest.mark.parametrize("name", SELECTING)
def test_both_budget_modes_keep_the_same_keys(name):
    cls = get_method_class(name)
    for m in (1, 3, 16, 64, 1000):
        assert cls.params_for_keys(m) == cls.params_for_budget(m)
        paid = cls(m).keys_per_query(1, 4096, FULL)
        whole_pages = 16 * math.ceil(m / 16)  # a page method reads whole pages (the last query's
        assert paid <= (m if name == "streaming" else whole_pages), (m, paid)  # own: 1 key)


@pytest.mark.parametrize("sinks, window", [(4, 12), (0, 5), (3, 1), (6, 30)])
@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_streaming_is_exact_attention_over_sinks_and_window(mask, sinks, window):
    n_k = 97
    n_q = n_q_of(mask, n_k)
    q, k, v = make_qkv(1, 2, n_q, n_k, 21, 13)
    method = make_method("streaming", 64, sinks=sinks, window=window)
    out = method(q, k, v, scale=0.3, generator=gen(0), mask=mask)
    positions = [mask.offset + i if mask.is_causal else n_k - 1 for i in range(n_q)]
    kept = [
        {j for j in range(p + 1) if j < sinks or j > p - window} for p in positions
    ]  # written from the paper's rule, not from the module
    assert torch.allclose(out, subset_attention(q, k, v, 0.3, kept), rtol=1e-10, atol=1e-12)
    paid = method.keys_per_query(n_q, n_k, mask)
    assert paid == pytest.approx(sum(map(len, kept)) / n_q)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    page=st.integers(1, 9),
    n_k=st.integers(1, 60),
    spread=st.sampled_from([0.01, 1.0, 30.0]),
)
def test_quest_page_bound_is_an_upper_bound_of_every_logit_in_the_page(seed, page, n_k, spread):
    q, k, _ = make_qkv(1, 2, 3, n_k, 5, seed=seed, spread=spread)
    low, high = page_bounds(k, page)
    bound = q.clamp(min=0) @ high.mT + q.clamp(max=0) @ low.mT  # (1, 2, 3, n_pages)
    logits = q @ k.mT
    for j in range(n_k):
        assert (logits[..., j] <= bound[..., j // page] + 1e-9 * (1 + logits.abs().max())).all()
    # and it is attained by a corner of the box, so it is tight for a page of one key
    if page == 1:
        assert torch.allclose(bound, logits)


def test_quest_reads_the_pages_its_bound_ranks_first():
    """Keys in 2-d, pages of 2: the query (1, 0) bounds page P by max over P of k_x.  The pages'
    bounds are 0.5, 3, 1, 2 (page 4 is its own), so with 3 pages it reads pages 1 and 3 and its
    own; the mass of page 0 is lost, that of page 2 too."""
    k = torch.tensor(
        [[0.5, 0], [0.1, 2], [3, -1], [-4, 0], [1, 1], [0, 0], [2, 0], [-1, 5], [0.2, 0]],
        dtype=torch.float64,
    ).view(1, 1, 9, 2)
    v = torch.randn(1, 1, 9, 3, generator=gen(0), dtype=torch.float64)
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64).view(1, 1, 1, 2)
    quest = make_method("quest", 6, page=2)
    out = quest(q, k, v, scale=1.0, generator=gen(0))
    expected = subset_attention(q, k, v, 1.0, [{2, 3, 6, 7, 8}])
    assert torch.allclose(out, expected, rtol=1e-12)
    assert quest.keys_per_query(1, 9, FULL) == 5  # one key of its own page, two full pages


def test_topk_pages_keeps_at_least_the_mass_quest_keeps():
    """Same pages, chosen by true mass: for every query the attention mass of the oracle's pages is
    at least that of quest's (the ceiling), and somewhere strictly more (the bound is loose)."""
    q, k, v = make_qkv(1, 2, 150, 150, 16, 8)
    mask = Causal(0)
    probabilities = torch.softmax(
        (0.25 * q @ k.mT).masked_fill(~mask.allowed(150, 150), float("-inf")), -1
    )
    recalls = {}
    for name in ("quest", "topk_pages"):
        method = make_method(name, 48)
        positions = query_positions(150, 150, mask, q.device)
        prepared = method.prepare_pages(k)
        chosen = method.selector(q, k, 0.25, positions, prepared)(0, 150)
        kept = torch.zeros_like(probabilities).scatter_reduce(
            -1, chosen.index, chosen.valid.double(), reduce="amax"
        )
        recalls[name] = (probabilities * kept).sum(-1)
        assert chosen.keys_per_query() == method.keys_per_query(150, 150, mask)
    assert (recalls["topk_pages"] >= recalls["quest"] - 1e-12).all()
    assert (recalls["topk_pages"] > recalls["quest"] + 1e-6).any()


@pytest.mark.parametrize("mask", MASKS, ids=str)
@pytest.mark.parametrize("name", SELECTING)
def test_keys_per_query_is_the_count_of_keys_the_selection_read(name, mask):
    """The keys column is measured from the slots the method used, not from its budget."""
    n_k = 97
    n_q = n_q_of(mask, n_k)
    q, k, _ = make_qkv(1, 2, n_q, n_k, 21)
    for m in (5, 16, 40):
        method = make_method(name, m)
        positions = query_positions(n_q, n_k, mask, q.device)
        if name == "streaming":
            chosen = method.selector(positions, n_k, q.shape[:2])(0, n_q)
        else:
            chosen = method.selector(q, k, 0.3, positions, method.prepare_pages(k))(0, n_q)
        assert chosen.keys_per_query() == pytest.approx(method.keys_per_query(n_q, n_k, mask))
        # no slot reads a key after the query's position
        assert (chosen.index[chosen.valid] <= n_k - 1).all()
        later = chosen.index > positions.view(1, 1, -1, 1)
        assert not (later & chosen.valid).any()


def test_quest_shared_pages_are_one_choice_per_group():
    """gqa=shared with group=2: heads 0-1 and 2-3 each read one set of pages, chosen by the
    summed bound; per-head choices differ within a group on random inputs."""
    q, k, _ = make_qkv(1, 4, 40, 200, 16)
    positions = query_positions(40, 200, Causal(160), q.device)
    chosen = {}
    for gqa in ("per-head", "shared"):
        method = make_method("quest", 48, gqa=gqa, group=2)
        select = method.selector(q, k, 0.25, positions, method.prepare_pages(k))
        chosen[gqa] = select(0, 40).index.sort(-1).values
    shared, own = chosen["shared"], chosen["per-head"]
    assert torch.equal(shared[:, 0], shared[:, 1]) and torch.equal(shared[:, 2], shared[:, 3])
    assert not torch.equal(own[:, 0], own[:, 1])


def test_quest_shared_refuses_heads_that_do_not_split_into_groups():
    q, k, v = make_qkv(1, 3, 4, 40, 8)
    with pytest.raises(UsageError, match="group=2"):
        make_method("quest", 16, gqa="shared", group=2)(q, k, v)


@pytest.mark.parametrize("name", KV_METHODS)
def test_a_decode_step_over_a_prepared_cache_is_the_forward(name):
    q, k, v = make_qkv(2, 2, 8, 300, 16, 8)
    method = make_method(name, 64)
    mask = Causal(292)
    cache = method.prepare_cache(k, v, mask=mask, scale=0.25, generator=gen(1))
    step = method.decode_step(q, cache)
    assert torch.allclose(step, method(q, k, v, scale=0.25, mask=mask, generator=gen(1)))
    assert (step - exact_attention(q, k, v, 0.25, mask=mask)).abs().max() > 1e-6  # it selects


@pytest.mark.parametrize("name", KV_METHODS)
def test_decode_error_falls_as_the_budget_grows(name):
    """A decode measurement (the last 16 queries over 512 keys): the mean error over 4 seeds falls
    from budget 32 to 256."""
    q, k, v = make_qkv(1, 2, 16, 512, 16, 8, seed=3)
    mask = Causal(496)
    reference = exact_attention(q, k, v, 0.25, mask=mask)

    def error(m):
        method = make_method(name, m)
        outs = [method(q, k, v, scale=0.25, mask=mask, generator=gen(s)) for s in range(4)]
        return sum(float((out - reference).norm()) for out in outs) / 4

    small, large = error(32), error(256)
    assert large < small, (small, large)


# ---- phases: a method refused in a phase is recorded as unsupported, with the reason ------------


class _DecodeOnly(get_method_class("streaming")):
    """A streaming that declares the decode phase only (not registered: the test puts it in the
    registry for its own duration)."""

    name = "decode_only_streaming"
    phases = ("decode",)
    phase_help = "its rule needs a prompt's queries"


def test_a_phase_a_method_does_not_define_is_unsupported_with_its_reason(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, _DecodeOnly.name, _DecodeOnly)
    g = gen(0)
    q, k, v = (torch.randn(1, 2, 96, 8, generator=g, dtype=torch.float64) for _ in range(3))
    qkv = kdecli.QKV(q, k, v, "test", default_causal=True)
    report = compare(
        qkv,
        [_DecodeOnly.name, "streaming"],
        [16],
        phase="both",
        queries=4,
        repeats=1,
        warmup=0,
        min_time=0,
    )
    status = {(r.method, r.phase): (r.status, r.reason) for r in report.results}
    assert status[(_DecodeOnly.name, "decode")][0] == "ok"
    assert status[("streaming", "prefill")][0] == "ok"
    refused, reason = status[(_DecodeOnly.name, "prefill")]
    assert refused == "unsupported"
    assert "decode phase only" in reason and "prompt's queries" in reason
    assert make_method("streaming", 16).phase_reasons("prefill") == []


# ---- magicpig ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, tables, angle", [(3, 5, 0.6), (2, 8, 1.2), (4, 6, 0.9)])
def test_magicpig_candidate_probability_matches_the_collision_rule(bits, tables, angle):
    """Over 4000 independent draws of the hyperplanes, the share of draws in which a key at angle
    θ from the query agrees in at least two tables is p(u = 1 − θ/π) within 4 standard errors."""
    d, draws = 6, 4000
    q = torch.zeros(1, 1, 1, d, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 1, d, dtype=torch.float64)
    k[..., 0], k[..., 1] = math.cos(angle), math.sin(angle)
    planes = torch.randn(draws, 1, d, bits * tables, generator=gen(9), dtype=torch.float64)
    hits = collisions(
        simhash_codes(q.expand(draws, 1, 1, d), planes, bits, tables),
        simhash_codes(k.expand(draws, 1, 1, d), planes, bits, tables),
    )
    share = float((hits >= 2).double().mean())
    p = float(collision_probability(torch.tensor(1 - angle / math.pi), bits, tables))
    standard_error = math.sqrt(p * (1 - p) / draws)
    assert abs(share - p) <= 4 * standard_error, (share, p, standard_error)
    assert 0.02 < p < 0.98  # the check has power: p is neither 0 nor 1


def test_magicpig_error_falls_as_the_tables_grow():
    """More tables, more candidates, a lower-variance estimate: the mean error over 4 seeds of a
    decode measurement falls from L = 4 to L = 64 (K = 4, a small exact part)."""
    q, k, v = make_qkv(1, 2, 8, 600, 16, 8, seed=5, spread=1.5)
    mask = Causal(592)
    reference = exact_attention(q, k, v, 0.25, mask=mask)

    def mean_error(tables):
        method = make_method("magicpig", 16, bits=4, tables=tables)
        return (
            sum(
                float((method(q, k, v, scale=0.25, mask=mask, generator=gen(s)) - reference).norm())
                for s in range(4)
            )
            / 4
        )

    few, many = mean_error(4), mean_error(64)
    assert many < 0.7 * few, (few, many)


def test_magicpig_keys_are_counted_on_the_calls_own_draw():
    """The realised count: at least the exact part, at most the prefix, different across draws,
    and larger with more tables; compare's keys column holds it."""
    q, k, v = make_qkv(1, 2, 8, 600, 16, 8, seed=5, spread=1.5)
    mask = Causal(592)
    method = make_method("magicpig", 16, bits=4, tables=16)
    counts = [method.realised_keys_per_query(q, k, v, 0.25, gen(s), mask) for s in range(3)]
    exact_part = method.config["sinks"] + method.config["window"]
    assert all(exact_part < c <= 600 for c in counts) and len(set(counts)) > 1
    more = make_method("magicpig", 16, bits=4, tables=64)
    assert more.realised_keys_per_query(q, k, v, 0.25, gen(0), mask) > counts[0]
    qkv = kdecli.QKV(q, k, v, "test", default_causal=True)
    report = compare(
        qkv, ["magicpig"], [16], params={"magicpig": {"bits": 4, "tables": 16}},
        phase="decode", queries=8, repeats=1, warmup=0, min_time=0, seeds=2,
    )  # fmt: skip
    recorded = [r.keys_per_query for r in report.results]
    assert all(exact_part < c <= 600 for c in recorded) and len(set(recorded)) == 2
