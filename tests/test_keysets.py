"""The key sets each method reports (``key_sets``) are the ones its forward used, and its row-sum
estimate (``log_row_sums``) is on the scale of the exact one.

For a method exact over its sets, softmax restricted to the sets reproduces the forward: that is
what proves they are the sets it read.  For an estimator, its output is recomputed from the sets
(the same draws: the same generator state).  Every set lies inside the mask.
"""

from __future__ import annotations

import pytest
import torch

from kdecli.masks import FULL, Causal
from kdecli.methods import make_method
from kdecli.methods.base import AttentionMethod

N, D = 37, 8
# (mask, n_q, n_k): full; prefill; queries after a prefix, with keys past the last query (which
# the call drops); one decode query at the last position (which runs as full)
CASES = [(FULL, N, N), (Causal(0), N, N), (Causal(5), N, N + 8), (Causal(N + 2), 1, N + 3)]
CASE_IDS = ["full", "causal", "offset", "decode"]


def inputs(seed=0, b=2, h=2, n_q=N, n_k=N, d=D, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g, dtype=dtype)
    k = torch.randn(b, h, n_k, d, generator=g, dtype=dtype)
    v = torch.randn(b, h, n_k, d, generator=g, dtype=dtype)
    return q, k, v


def dense(sets, chunk=5):
    """Every row of ``sets``, asked for in chunks of ``chunk`` queries (not the forward's)."""
    return torch.cat(
        [sets.rows(s, min(sets.n_q, s + chunk)) for s in range(0, sets.n_q, chunk)], dim=-2
    )


def allowed(mask, n_q, n_k):
    a = mask.allowed(n_q, n_k)
    return torch.ones(n_q, n_k, dtype=torch.bool) if a is None else a


def logits_of(q, k, scale):
    return (q.double() * scale) @ k.double().transpose(-1, -2)


def softmax_over(read, q, k, v, scale):
    """Exact softmax attention of each query over its set (float64)."""
    logits = logits_of(q, k, scale).masked_fill(~read, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v.double()


def exact_lse(q, k, scale, mask):
    n_q, n_k = q.shape[-2], k.shape[-2]
    logits = logits_of(q, k, scale).masked_fill(~allowed(mask, n_q, n_k), float("-inf"))
    return torch.logsumexp(logits, dim=-1)


def run(method, q, k, v, mask, seed=1):
    scale = 1.0 / D**0.5
    out = method(q, k, v, scale=scale, generator=torch.Generator().manual_seed(seed), mask=mask)
    sets = method.key_sets(q, k, v, scale, torch.Generator().manual_seed(seed), mask)
    return scale, out, sets


def check_within_mask(read, mask):
    n_q, n_k = read.shape[-2:]
    assert not (read & ~allowed(mask, n_q, n_k)).any()
    assert read.any(-1).all()  # every query reads at least one key


def check_exact_over_sets(name, params, case, seed=1):
    mask, n_q, n_k = case
    q, k, v = inputs(n_q=n_q, n_k=n_k)
    method = make_method(name, None, **params)
    scale, out, sets = run(method, q, k, v, mask, seed)
    assert sets is not None and sets.exact_over_set
    assert (sets.n_q, sets.n_k) == (q.shape[-2], k.shape[-2])
    read = dense(sets)
    check_within_mask(read, mask)
    torch.testing.assert_close(out.double(), softmax_over(read, q, k, v, scale))
    return read


# ---- topk ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_topk_sets_are_its_top_keys(case):
    mask, n_q, n_k = case
    read = check_exact_over_sets("topk", {"keys": 6}, case)
    q, k, _ = inputs(n_q=n_q, n_k=n_k)
    logits = logits_of(q, k, 1.0 / D**0.5).masked_fill(~allowed(mask, n_q, n_k), float("-inf"))
    kept = read.sum(-1)
    visible = allowed(mask, n_q, n_k).sum(-1)
    assert torch.equal(kept, visible.clamp(max=6).expand_as(kept))
    # an independent top-6: the smallest kept logit is at least the largest dropped one
    low = logits.masked_fill(~read, float("inf")).amin(-1)
    high = logits.masked_fill(read, float("-inf")).amax(-1)
    assert (low >= high).all()


def test_topk_sets_in_forward_chunks_whatever_the_request():
    q, k, v = inputs()
    sets = make_method("topk", None, keys=4).key_sets(q, k, v, 0.3, None, FULL)
    assert torch.equal(dense(sets, 1), dense(sets, N))
    assert torch.equal(sets.rows(10, 12), dense(sets)[..., 10:12, :])


# ---- the KV-cache family ------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "name, params",
    [
        ("streaming", {"sinks": 2, "window": 6}),
        ("streaming", {"sinks": 0, "window": 3}),
        ("quest", {"keys": 12, "page": 4}),
        ("quest", {"keys": 8, "page": 4, "gqa": "shared", "group": 2}),
        ("topk_pages", {"keys": 12, "page": 5}),
    ],
)
def test_kv_cache_sets_reproduce_the_forward(name, params, case):
    read = check_exact_over_sets(name, params, case)
    if name == "streaming":  # its sets are its positions' sinks and window
        method = make_method(name, None, **params)
        mask, n_q, n_k = case
        expected = method.keys_per_query(n_q, mask.key_span(n_q, n_k), mask.effective(n_q, n_k))
        assert read.sum(-1).double().mean() == pytest.approx(expected)


@pytest.mark.parametrize(
    "name, params",
    [
        ("h2o", {"keys": 10, "recent": 4}),
        ("h2o", {"keys": 60, "recent": 4}),  # nothing evicted
        ("snapkv", {"keys": 10, "obs": 4, "pool": 3}),
        ("snapkv", {"keys": 10, "obs": 4, "pool": 3, "gqa": "shared", "group": 2}),
    ],
)
@pytest.mark.parametrize("steps", [1, 6])
def test_prompt_chosen_decode_steps_read_their_sets(name, params, steps):
    n_k = N + 3
    q_all, k, v = inputs(n_q=n_k, n_k=n_k)
    prompt, q = q_all[..., : n_k - steps, :], q_all[..., n_k - steps :, :]
    mask = Causal(n_k - steps)
    method = make_method(name, None, **params)
    assert method.key_sets(q, k, v, 0.3, None, mask) is None and method.key_set_note
    cache = method.prepare_cache(k, v, mask=mask, scale=0.3, queries=prompt)
    sets = method.decode_key_sets(q, cache)
    assert sets.exact_over_set and (sets.n_q, sets.n_k) == (steps, n_k)
    read = dense(sets, 4)
    check_within_mask(read, mask)
    out = method.decode_step(q, cache)
    torch.testing.assert_close(out.double(), softmax_over(read, q, k, v, 0.3))
    if params["keys"] >= n_k:  # nothing is evicted: every allowed key
        assert torch.equal(read, allowed(mask, steps, n_k).expand_as(read))


# ---- estimators over their sets: uniform, magicpig ----------------------------------------------


def check_estimator_sets(name, params, case, seed=1):
    """The sets of an estimator: within the mask, the same on a second call with the same seed,
    and ``exact_over_set`` False.  Returns (method, scale, q, k, v, out, read)."""
    mask, n_q, n_k = case
    q, k, v = inputs(n_q=n_q, n_k=n_k)
    method = make_method(name, None, **params)
    scale, out, sets = run(method, q, k, v, mask, seed)
    assert sets is not None and not sets.exact_over_set
    assert (sets.n_q, sets.n_k) == (n_q, n_k)
    read = dense(sets)
    check_within_mask(read, mask)
    again = method.key_sets(q, k, v, scale, torch.Generator().manual_seed(seed + 1), mask)
    assert not torch.equal(dense(again), read) or not method.randomized or n_q == 1
    return method, scale, q, k, v, out, read


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_uniform_sets_are_its_sample(case):
    mask, n_q, n_k = case
    method, scale, q, k, v, out, read = check_estimator_sets("uniform", {"samples": 7}, case)
    # softmax over the set is its output; the row sum it estimates is n_k/m times the set's
    torch.testing.assert_close(out.double(), softmax_over(read, q, k, v, scale))
    keys = mask.key_span(n_q, n_k)
    sample = read[..., -1, :]  # the last query sees every kept key: the whole draw
    assert torch.equal(sample.sum(-1), torch.full_like(sample.sum(-1), 7))
    assert not sample[..., keys:].any()
    visible = sample.unsqueeze(-2) & allowed(mask, n_q, n_k)
    assert torch.equal(read, torch.where(visible.any(-1, keepdim=True), visible, read))
    lse = method.log_row_sums(q, k, v, scale, torch.Generator().manual_seed(1), mask)
    set_lse = torch.logsumexp(logits_of(q, k, scale).masked_fill(~read, float("-inf")), -1)
    scaled = (lse - set_lse - torch.log(torch.tensor(keys / 7.0, dtype=lse.dtype))).abs() < 1e-9
    exact = (lse - set_lse).abs() < 1e-9  # a query before the first sample: its exact prefix
    assert (scaled | exact).all() and scaled.any()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_uniform_row_sums_exact_at_its_limit(case):
    mask, n_q, n_k = case
    q, k, v = inputs(n_q=n_q, n_k=n_k)
    method = make_method("uniform", None, **make_method("uniform", 1).exact_limit(n_q, n_k))
    lse = method.log_row_sums(q, k, v, 0.4, torch.Generator().manual_seed(3), mask)
    torch.testing.assert_close(lse, exact_lse(q, k, 0.4, mask))


def magicpig_logits(method, q, k, scale, read, mask):
    """ℓ_ij − log p_ij on the candidates (read, outside the sinks and window), ℓ_ij on the
    exact part: the importance correction computed here from the angles."""
    import math

    from kdecli.methods.magicpig import collision_probability

    n_q, n_k = q.shape[-2], k.shape[-2]
    keys = mask.key_span(n_q, n_k)
    positions = (
        torch.arange(n_q) + mask.offset
        if mask.effective(n_q, keys).is_causal
        else torch.full((n_q,), keys - 1)
    ).unsqueeze(-1)
    j = torch.arange(n_k)
    exact = (j <= positions) & (
        (j < method.config["sinks"]) | (j > positions - method.config["window"])
    )
    cosine = torch.nn.functional.cosine_similarity(q.unsqueeze(-2), k.unsqueeze(-3), dim=-1)
    chance = collision_probability(
        1 - torch.arccos(cosine.clamp(-1, 1)) / math.pi,
        method.config["bits"],
        method.tables_for(keys),
    )
    logits = logits_of(q, k, scale)
    return torch.where(read & ~exact, logits - chance.log(), logits).masked_fill(~read, -math.inf)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_magicpig_forward_recomputed_from_its_sets(case):
    params = {"bits": 2, "tables": 4, "sinks": 2, "window": 5}
    method, scale, q, k, v, out, read = check_estimator_sets("magicpig", params, case)
    logits = magicpig_logits(method, q, k, scale, read, case[0])
    torch.testing.assert_close(out, torch.softmax(logits, -1) @ v)
    lse = method.log_row_sums(q, k, v, scale, torch.Generator().manual_seed(1), case[0])
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_magicpig_row_sums_exact_at_its_limit(case):
    mask, n_q, n_k = case
    q, k, v = inputs(n_q=n_q, n_k=n_k)
    method = make_method(
        "magicpig", None, tables=4, **make_method("magicpig", 1).exact_limit(n_q, n_k)
    )
    lse = method.log_row_sums(q, k, v, 0.4, torch.Generator().manual_seed(3), mask)
    torch.testing.assert_close(lse, exact_lse(q, k, 0.4, mask))


# ---- the decomposition's methods: sets over every piece, read exactly where the forward reads ----

DECOMPOSED = [
    ("reformer", {"chunk_size": 4, "n_hashes": 2, "causal_leaf": 6}),
    ("kdeformer", {"block_size": 4, "samples": 5, "sampling": "uniform", "causal_leaf": 6}),
    ("kdeformer", {"block_size": 4, "samples": 5, "sampling": "uniform", "pairing": "rank",
                   "causal_leaf": 5}),
    ("hyperattention", {"block_size": 4, "samples": 5, "min_seq_len": 4}),
    ("thinformer", {"coreset": 8, "causal_leaf": 6}),
]  # fmt: skip


def read_by_gradient(method, q, k, v, scale, mask, seed=1):
    """Which keys' values each output row depends on: the nonzero pattern of ∂Õ_i/∂v_j (one
    value column, every slice), with the same draws on every evaluation."""

    def first_column(column):
        values = torch.cat([column.unsqueeze(-1), v[..., 1:]], dim=-1)
        g = torch.Generator().manual_seed(seed)
        return method(q, k, values, scale=scale, generator=g, mask=mask)[..., 0]

    jac = torch.autograd.functional.jacobian(first_column, v[..., 0].clone(), vectorize=True)
    b, h = q.shape[:2]
    slices = jac.flatten(0, 1).flatten(2, 3)  # (b·h, n_q, b·h, n_k)
    own = torch.stack([slices[s, :, s] for s in range(b * h)]).view(b, h, *jac.shape[2:3], -1)
    assert int((slices != 0).sum()) == int((own != 0).sum())  # nothing crosses slices
    return own != 0


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "name, params", DECOMPOSED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DECOMPOSED)]
)
def test_decomposed_sets_are_the_keys_the_output_reads(name, params, case):
    mask, n_q, n_k = case
    q, k, v = inputs(n_q=n_q, n_k=n_k)
    method = make_method(name, None, **params)
    scale, out, sets = run(method, q, k, v, mask)
    assert sets is not None and (sets.n_q, sets.n_k) == (n_q, n_k)
    read = dense(sets)
    check_within_mask(read, mask)
    assert torch.equal(read, read_by_gradient(method, q, k, v, scale, mask))
    if sets.exact_over_set:
        torch.testing.assert_close(out, softmax_over(read, q, k, v, scale))
    # the same generator state, the same sets; another state, others
    again = method.key_sets(q, k, v, scale, torch.Generator().manual_seed(1), mask)
    assert torch.equal(dense(again, 7), read)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_scatterbrain_sets_are_its_band_and_exact_leaves(case):
    """Its set is the keys whose logits it computes exactly: the band |j − p_i| ≤ radius of
    each full block (p_i = i on a plain call) and, causal, every allowed key of the leaves;
    the low-rank part weighs the others without reading their logits."""
    mask, n_q, n_k = case
    q, k, v = inputs(n_q=n_q, n_k=n_k)
    method = make_method("scatterbrain", None, local_context=6, causal_leaf=4)
    scale, _, sets = run(method, q, k, v, mask)
    assert not sets.exact_over_set
    read = dense(sets)
    check_within_mask(read, mask)
    keys = mask.key_span(n_q, n_k)
    if mask.effective(n_q, keys).is_causal:
        position = torch.arange(n_q).unsqueeze(-1) + mask.offset
    else:
        position = torch.arange(n_q).unsqueeze(-1) * keys // n_q
    distance = torch.arange(n_k) - position
    band = (distance.abs() <= 2) & allowed(mask, n_q, n_k)  # radius of local_context = 6
    assert (read | ~band).all()  # the band is always read
    if not mask.effective(n_q, keys).is_causal:
        assert torch.equal(read, band.expand_as(read))
    else:  # beyond the band: a leaf's keys, at most causal_leaf − 1 positions back
        assert (distance.masked_fill(~read, 0) >= -3).all()
    limit = make_method("scatterbrain", None, **method.exact_limit(n_q, n_k))
    every = dense(limit.key_sets(q, k, v, scale, None, mask))
    assert torch.equal(every, allowed(mask, n_q, n_k).expand_as(every))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "name, params",
    DECOMPOSED
    + [
        ("scatterbrain", {"local_context": 6, "causal_leaf": 6}),
        ("nystromformer", {"landmarks": 4, "causal_leaf": 6}),
    ],
)
def test_decomposed_row_sums_exact_at_the_limit(name, params, case):
    mask, n_q, n_k = case
    q, k, v = inputs(n_q=n_q, n_k=n_k)
    limit = make_method(name, 1).exact_limit(n_q, n_k)
    method = make_method(name, None, **{**params, **limit})
    lse = method.log_row_sums(q, k, v, 0.4, torch.Generator().manual_seed(3), mask)
    if name == "nystromformer" and not mask.effective(n_q, mask.key_span(n_q, n_k)).is_causal:
        assert lse is None  # a plain call forms no row sum
        return
    torch.testing.assert_close(lse, exact_lse(q, k, 0.4, mask))
    if name != "reformer":  # an estimate, near the exact one off the limit
        return
    estimate = make_method(name, None, **params)
    lse = estimate.log_row_sums(q, k, v, 0.4, torch.Generator().manual_seed(3), mask)
    sets = dense(estimate.key_sets(q, k, v, 0.4, torch.Generator().manual_seed(3), mask))
    set_lse = torch.logsumexp(logits_of(q, k, 0.4).masked_fill(~sets, float("-inf")), -1)
    torch.testing.assert_close(lse, set_lse)  # reformer's row sum is its set's


# ---- methods without sets: their reasons; performer's row sums ----------------------------------


@pytest.mark.parametrize("name", ["performer", "nystromformer", "rankk", "exact", "mean"])
def test_methods_without_sets_say_why(name):
    q, k, v = inputs()
    method = make_method(name, 8)
    assert method.key_sets(q, k, v, 0.3, torch.Generator().manual_seed(0), FULL) is None
    assert method.key_set_note and method.key_set_note != AttentionMethod.key_set_note


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_performer_row_sums_are_its_feature_sums(case):
    """log Σ_j φ(q_i)·φ(k_j) over the allowed keys, the features computed here from the
    directions the call draws (φ(x)_r = exp(ω_r·x − ‖x‖²/2)/√m, x scaled by √s)."""
    import math

    mask, n_q, n_k = case
    q, k, v = inputs(n_q=n_q, n_k=n_k)
    method = make_method("performer", None, features=64)
    lse = method.log_row_sums(q, k, v, 0.3, torch.Generator().manual_seed(2), mask)
    omega = method.directions(q, torch.Generator().manual_seed(2)).double()

    def features(x):
        x = x * math.sqrt(0.3)
        return torch.exp(x @ omega.mT - 0.5 * x.square().sum(-1, keepdim=True)) / 8

    pairs = torch.log(features(q) @ features(k).mT)
    pairs = pairs.masked_fill(~allowed(mask, n_q, n_k), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(pairs, -1))
    # an estimate of the exact row sums, not the sums themselves
    assert (lse - exact_lse(q, k, 0.3, mask)).abs().max() > 1e-3


OWN_METHODS = [  # the block-sparse methods have their own tests
    "exact", "mean", "topk", "rankk", "uniform", "streaming", "quest", "topk_pages", "magicpig",
    "kdeformer", "performer", "reformer", "scatterbrain", "hyperattention", "nystromformer",
    "thinformer",
]  # fmt: skip


@pytest.mark.parametrize("name", OWN_METHODS)
def test_every_method_either_reports_sets_or_says_why(name):
    q, k, v = inputs()
    method = make_method(name, 8)
    sets = method.key_sets(q, k, v, 0.3, torch.Generator().manual_seed(0), FULL)
    note = type(method).key_set_note
    assert (sets is None) == bool(note) or (name == "reformer" and sets is not None)


def test_reformer_shared_qk_reports_no_sets():
    q, k, v = inputs()
    method = make_method("reformer", 8, shared_qk=True)
    g = torch.Generator().manual_seed(0)
    assert method.key_sets(q, k, v, 0.3, g, FULL) is None
    assert method.log_row_sums(q, k, v, 0.3, g, Causal(0)) is None


@pytest.mark.parametrize("name, params", [("topk", {"keys": 6}), ("quest", {"keys": 8, "page": 4})])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sets_are_the_working_dtype_ones(name, params, dtype):
    """A half-precision call selects in float32 (the working dtype): its sets, from the same
    products, reproduce its output to half-precision rounding."""
    q, k, v = (x.to(dtype) for x in inputs())
    method = make_method(name, None, **params)
    out = method(q, k, v, scale=0.3, mask=Causal(0))
    read = dense(method.key_sets(q, k, v, 0.3, None, Causal(0)))
    expected = softmax_over(read, q, k, v, 0.3)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)
