"""One battery over every registered method: the contract of kdecli/methods/base.py.

Nothing here names a method: a newly registered method is tested without changing this file.
"""

import math

import pytest
import torch

from kdecli.errors import ParameterError
from kdecli.methods import get_method_class, make_method, method_names
from kdecli.reference import exact_attention
from tests.conftest import gen, make_qkv

ALL = method_names()
BUDGET = 16
SHAPES = [  # (b, h, n_q, n_k, d, d_v): awkward sizes on purpose
    (2, 3, 47, 47, 21, 21),
    (1, 2, 97, 97, 21, 13),
    (1, 1, 1025, 1025, 21, 8),
    (2, 1, 59, 97, 21, 21),  # cross attention: n_q != n_k
]


def build(name, **params):
    cls = get_method_class(name)
    return make_method(name, BUDGET if cls.uses_budget else None, **params)


def runnable(method, q, k, v, causal=False):
    reasons = method.not_supported_reasons(q, k, v, causal)
    if reasons:
        pytest.skip(f"{method.name}: {'; '.join(reasons)}")


@pytest.mark.parametrize("name", ALL)
def test_describes_itself(name):
    info = get_method_class(name).describe()
    assert info["name"] == name
    for key in ("summary", "paper", "budget"):
        assert isinstance(info[key], str) and info[key].strip(), key
    for p in info["params"]:
        assert p["help"] and p["range"]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", ALL)
def test_shape_dtype_finite_and_pure(name, dtype, shape):
    b, h, n_q, n_k, d, d_v = shape
    q, k, v = make_qkv(b, h, n_q, n_k, d, d_v, dtype=dtype)
    method = build(name)
    if not get_method_class(name).supports_cross and n_q != n_k:
        assert method.not_supported_reasons(q, k, v), "must say why it cannot run on n_q != n_k"
        return
    runnable(method, q, k, v)
    before = [t.clone() for t in (q, k, v)]
    out = method(q, k, v, scale=d**-0.5, generator=gen(1))
    assert out.shape == (b, h, n_q, d_v)
    assert out.dtype == dtype
    assert out.device == q.device
    assert torch.isfinite(out).all()
    for original, now in zip(before, (q, k, v)):
        assert torch.equal(original, now), "a method must not modify its inputs"
    assert type(out) is torch.Tensor


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_result_and_seed_matters(name):
    q, k, v = make_qkv(1, 2, 97, 97, 21)
    method = build(name)
    runnable(method, q, k, v)
    first = method(q, k, v, scale=0.2, generator=gen(5))
    again = method(q, k, v, scale=0.2, generator=gen(5))
    assert torch.equal(first, again)
    other = method(q, k, v, scale=0.2, generator=gen(6))
    if get_method_class(name).randomized:
        assert not torch.equal(first, other), "a randomized method must use its generator"
    else:
        assert torch.equal(first, other)


@pytest.mark.parametrize("name", ALL)
def test_no_global_randomness(name):
    q, k, v = make_qkv(1, 1, 97, 97, 21)
    method = build(name)
    runnable(method, q, k, v)
    torch.manual_seed(0)
    first = method(q, k, v, scale=0.2, generator=gen(3))
    torch.manual_seed(123)
    second = method(q, k, v, scale=0.2, generator=gen(3))
    assert torch.equal(first, second), "randomness must come only from `generator`"


@pytest.mark.parametrize("n_q, n_k", [(97, 97), (59, 97)])
@pytest.mark.parametrize("name", ALL)
def test_batch_slices_independent(name, n_q, n_k):
    """Changing one batch item leaves every other item's output bit-identical (lengths that no
    block, chunk or segment size divides, so padding is exercised)."""
    q, k, v = make_qkv(3, 2, n_q, n_k, 21, 13)
    method = build(name)
    runnable(method, q, k, v)
    out = method(q, k, v, scale=0.2, generator=gen(2))
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[1], k2[1], v2[1] = q2[1] * 3 + 1, k2[1].flip(-2), -v2[1]
    out2 = method(q2, k2, v2, scale=0.2, generator=gen(2))
    # Randomized methods draw per slice in a fixed order, so the other slices see the same draws.
    assert torch.equal(out[0], out2[0]) and torch.equal(out[2], out2[2])
    assert not torch.equal(out[1], out2[1])


@pytest.mark.parametrize("name", ALL)
def test_large_logits_stay_finite_in_float32(name):
    q, k, v = make_qkv(1, 2, 97, 97, 21, dtype=torch.float32, spread=6.0)
    method = build(name)
    runnable(method, q, k, v)
    scale = 21**-0.5
    logits = scale * q @ k.transpose(-1, -2)
    assert logits.abs().max() > 100, "the test must actually reach large logits"
    out = method(q, k, v, scale=scale, generator=gen(0))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_bfloat16_runs_finite(name):
    q, k, v = make_qkv(1, 1, 97, 97, 21, dtype=torch.bfloat16, spread=4.0)
    method = build(name)
    runnable(method, q, k, v)
    out = method(q, k, v, scale=21**-0.5, generator=gen(0))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", ALL)
def test_bad_parameters_are_rejected_with_their_name(name):
    cls = get_method_class(name)
    for p in cls.params:
        bad_values = []
        if p.choices is not None:
            bad_values.append("no-such-choice")
        elif p.type is bool:
            bad_values.append("maybe")
        elif p.type in (int, float):
            bad_values.append("not-a-number")
            if p.low is not None:
                bad_values.append(p.low - 1)
            if p.high is not None and math.isfinite(p.high):
                bad_values.append(p.high * 2 + 1)
        for value in bad_values:
            with pytest.raises(ParameterError) as info:
                build(name, **{p.name: value})
            assert f"`{p.name}`" in info.value.message and name in info.value.message
    with pytest.raises(ParameterError, match="unknown parameter"):
        build(name, no_such_parameter=1)
    if cls.params:
        typo = cls.params[0].name[:-1] + "x"
        with pytest.raises(ParameterError, match=f"Did you mean `{cls.params[0].name}`"):
            build(name, **{typo: 1})
    if cls.uses_budget:
        for budget in (0, -3):
            with pytest.raises(ParameterError, match="budget"):
                make_method(name, budget)


@pytest.mark.parametrize("name", ALL)
def test_parameters_win_over_budget(name):
    cls = get_method_class(name)
    if not cls.uses_budget:
        return
    mapped = cls.params_for_budget(64)
    for key, value in mapped.items():
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            method = make_method(name, 64, **{key: value - 1})
            assert method.config[key] == value - 1


@pytest.mark.parametrize("name", ALL)
def test_causal_supported_or_explained(name):
    q, k, v = make_qkv(1, 2, 97, 97, 21)
    method = build(name)
    reasons = method.not_supported_reasons(q, k, v, causal=True)
    if not get_method_class(name).supports_causal:
        assert reasons, "a method without causal support must say so"
        return
    if reasons:
        pytest.skip("; ".join(reasons))
    out = method(q, k, v, scale=0.2, generator=gen(0), causal=True)
    assert torch.isfinite(out).all()
    # The first query sees only the first key: every causal estimate must return v_0 there.
    assert torch.allclose(out[..., 0, :], v[..., 0, :], atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_flops_model_is_positive(name):
    method = build(name)
    flops = method.flops(2, 3, 1024, 1024, 64, 64)
    assert math.isfinite(flops) and flops > 0


def test_exact_method_matches_reference():
    q, k, v = make_qkv(2, 2, 97, 59, 21, 13)
    out = make_method("exact")(q, k, v, scale=0.3)
    assert (out - exact_attention(q, k, v, 0.3)).abs().max() < 1e-12
