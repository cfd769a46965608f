"""``kdecli.hf.patch``: a method inside chosen layers of a real (tiny) transformers model.

The oracle is the stock model: with ``exact`` patched in, its outputs must match stock SDPA to
float32 rounding (here: exactly), generation included; afterwards (also after an exception) the
model must be bit-identical to what it was.  Causality is judged by a future token: changing the
last token must not move any earlier position's logits.
"""

from __future__ import annotations

import pytest
import torch

from kdecli.errors import ParameterError, UsageError
from kdecli.methods import get_method_class, method_names
from tests._models import build, needs_hf

pytestmark = needs_hf
N = 24


@pytest.fixture(scope="module")
def llama():
    return build("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(2, 300, (1, N), generator=torch.Generator().manual_seed(3))


def _logits(model, ids):
    with torch.inference_mode():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_exact_in_every_layer_is_the_stock_model(arch, ids):
    import kdecli.hf

    model = build(arch)
    stock = _logits(model, ids)
    with kdecli.hf.patch(model, "exact", layers=None):
        patched = _logits(model, ids)
    assert torch.allclose(patched, stock, rtol=0, atol=1e-6)
    with kdecli.hf.patch(model, "performer", budget=8, layers=[0]):
        approx = _logits(model, ids)
    assert (approx - stock).abs().max() > 1e-4  # the check can fail: a method does change it


def test_the_model_is_restored_bit_identically_also_after_an_exception(llama, ids):
    import kdecli.hf

    before = _logits(llama, ids)
    with kdecli.hf.patch(llama, "uniform", budget=4, layers="0-1", seed=1):
        inside = _logits(llama, ids)
    assert not torch.equal(inside, before)
    assert torch.equal(_logits(llama, ids), before)
    with pytest.raises(RuntimeError, match="inside the block"):
        with kdecli.hf.patch(llama, "uniform", budget=4, layers=[2]):
            _logits(llama, ids)
            raise RuntimeError("inside the block")
    assert torch.equal(_logits(llama, ids), before)
    assert llama.config._attn_implementation == "sdpa"


def test_same_seed_same_outputs_other_seed_other_outputs(llama, ids):
    import kdecli.hf

    runs = {}
    for seed in (0, 0, 1):
        with kdecli.hf.patch(llama, "performer", budget=8, layers=[0, 2], seed=seed):
            runs.setdefault(seed, []).append(_logits(llama, ids))
    assert torch.equal(runs[0][0], runs[0][1])
    assert not torch.equal(runs[0][0], runs[1][0])


def _future(ids):
    future = ids.clone()
    future[0, -1] = (future[0, -1] + 1) % 300
    return future


def _budget(name):
    return 8 if get_method_class(name).uses_budget else None


@pytest.mark.parametrize("name", method_names())
def test_every_method_runs_causally_in_a_decoder_layer(name, llama, ids):
    """Every registered method, causal, in layer 1 of a GQA + RoPE decoder: finite, as seeded,
    and the last position sees its own token."""
    import kdecli.hf

    if get_method_class(name).needs_prompt_queries:  # refused by patch: test_kvcache_prompt.py
        pytest.skip(f"{name} needs the prompt's queries, which a model's call does not pass")

    with kdecli.hf.patch(llama, name, budget=_budget(name), layers=[1], seed=0) as bound:
        first = _logits(llama, ids)
    with kdecli.hf.patch(llama, name, budget=_budget(name), layers=[1], seed=0):
        again = _logits(llama, ids)
        changed = _logits(llama, _future(ids))
    assert bound.method.name == name and bound.layers == [1]
    assert torch.isfinite(first).all() and torch.equal(first, again)
    assert not torch.equal(changed[:, -1], first[:, -1])


@pytest.mark.parametrize("name", method_names())
def test_no_later_token_reaches_an_earlier_position(name, llama, ids):
    """In a decoder, changing the last token leaves every earlier position's logits unchanged:
    the whole model stays causal.  A method whose full blocks group their queries declares so
    (``causal_query_coupled``, checked by the contract battery): a later token's query then moves
    earlier outputs, and this does not hold for it."""
    import kdecli.hf

    if get_method_class(name).causal_query_coupled:
        pytest.skip(f"{name} declares causal_query_coupled")
    if get_method_class(name).needs_prompt_queries:  # refused by patch: test_kvcache_prompt.py
        pytest.skip(f"{name} needs the prompt's queries, which a model's call does not pass")

    with kdecli.hf.patch(llama, name, budget=_budget(name), layers=[1], seed=0):
        first = _logits(llama, ids)
    with kdecli.hf.patch(llama, name, budget=_budget(name), layers=[1], seed=0):
        changed = _logits(llama, _future(ids))
    assert torch.allclose(changed[:, :-1], first[:, :-1], rtol=0, atol=1e-6)


def test_generation_with_a_kv_cache_runs_each_decode_step_over_every_key(llama, ids):
    """A decode step is one query against all cached keys: run non-causally it is exact
    attention, so `exact` patched in generates the stock model's tokens."""
    import kdecli.hf

    prompt = ids[:, :10]
    with torch.inference_mode():
        stock = llama.generate(prompt, max_new_tokens=6, do_sample=False)
        with kdecli.hf.patch(llama, "exact") as bound:
            patched = llama.generate(prompt, max_new_tokens=6, do_sample=False)
        with kdecli.hf.patch(llama, "performer", budget=8, layers=[0, 1], seed=2):
            approx = llama.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(patched, stock)
    assert bound.function.calls == {0: 6, 1: 6, 2: 6}  # the prefill and 5 decode steps
    assert approx.shape == stock.shape and torch.equal(approx[:, :10], prompt)


def test_several_queries_against_a_cache_run_under_the_offset_mask(llama):
    """A causal call of 3 queries against 7 keys (speculative decoding, a chunked prefill) runs
    with the queries at the last 3 positions (``Causal(4)``), not refused and not top-left; more
    queries than keys is refused with the layer named."""
    from kdecli.hf.interface import AttentionCall
    from kdecli.hf.patching import LayerMethod
    from kdecli.masks import Causal
    from kdecli.methods import make_method

    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 7, 8)
    call = AttentionCall(llama.model.layers[0].self_attn, 0, q, k, k, None, 0.3, True)
    assert call.positions == Causal(4)
    out = LayerMethod(make_method("exact"))(call)
    allowed = Causal(4).allowed(3, 7)
    bottom_right = torch.nn.functional.scaled_dot_product_attention(
        q, k, k, attn_mask=allowed, scale=0.3
    )
    assert torch.allclose(out, bottom_right, atol=1e-6)
    top_left = torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True, scale=0.3)
    assert not torch.allclose(out, top_left, atol=1e-3)
    one = AttentionCall(call.module, 0, q[:, :, :1], k, k, None, 0.3, True)
    out = LayerMethod(make_method("exact"))(one)
    full = torch.nn.functional.scaled_dot_product_attention(q[:, :, :1], k, k, scale=0.3)
    assert torch.allclose(out, full)
    wide = AttentionCall(call.module, 0, torch.randn(1, 4, 9, 8), k, k, None, 0.3, True)
    with pytest.raises(UsageError, match="layer 0: .*at most as many queries as keys"):
        LayerMethod(make_method("exact"))(wide)


def test_a_chunk_of_tokens_after_a_cache_matches_the_stock_model(llama, ids):
    """Three tokens at once after a cached prompt (how speculative decoding verifies a draft):
    with `exact` patched in, the logits are the stock model's."""
    import kdecli.hf

    def chunk_after_prompt():
        with torch.inference_mode():
            cache = llama(input_ids=ids[:, :10], use_cache=True).past_key_values
            return llama(input_ids=ids[:, 10:13], cache=cache).logits

    stock = chunk_after_prompt()
    assert torch.allclose(stock, _logits(llama, ids[:, :13])[:, 10:], atol=1e-5)  # the cache ran
    assert not torch.allclose(stock, _logits(llama, ids[:, 10:13]), atol=1e-3)
    with kdecli.hf.patch(llama, "exact"):
        patched = chunk_after_prompt()
    with kdecli.hf.patch(llama, "uniform", budget=4, layers=[1], seed=1):
        approx = chunk_after_prompt()
    assert torch.allclose(patched, stock, rtol=0, atol=1e-5)
    assert torch.isfinite(approx).all() and not torch.allclose(approx, stock, atol=1e-4)


def test_a_padding_mask_is_refused_in_one_line(llama):
    import kdecli.hf

    batch = torch.randint(2, 300, (2, N))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[0, -5:] = 0
    with kdecli.hf.patch(llama, "exact", layers=[1]):
        with pytest.raises(UsageError, match="padding") as info, torch.inference_mode():
            llama(input_ids=batch, attention_mask=mask)
        assert "\n" not in info.value.message and "layer 1" in info.value.message
        with torch.inference_mode():  # an all-ones mask is the plain causal pattern
            llama(input_ids=batch, attention_mask=torch.ones_like(mask))


def test_bad_requests_are_refused_before_the_model_runs(llama, ids):
    import kdecli.hf

    for kwargs, error, match in [
        ({"method": "kdeformr"}, UsageError, "Did you mean `kdeformer`"),
        ({"method": "performer", "budget": 0}, ParameterError, "budget"),
        ({"method": "performer", "params": {"featurs": 3}}, ParameterError, "features"),
        ({"layers": [5]}, UsageError, "out of range"),
        ({"layers": "2-0"}, UsageError, "backwards"),
    ]:
        with pytest.raises(error, match=match):
            with kdecli.hf.patch(llama, **kwargs):
                pytest.fail("the block must not run")
    assert llama.config._attn_implementation == "sdpa"


def test_a_method_instance_and_the_public_name(llama, ids):
    import kdecli.hf
    import kdecli.hf.patching  # importing the module must not hide the function
    from kdecli.methods import make_method

    assert callable(kdecli.hf.patch) and kdecli.hf.patch is kdecli.hf.patching.patch
    method = make_method("uniform", 4)
    with kdecli.hf.patch(llama, method, layers=[0]) as bound:
        _logits(llama, ids)
    assert bound.method is method
    with pytest.raises(UsageError, match="already built"):
        with kdecli.hf.patch(llama, method, params={"samples": 3}):
            pass


def test_a_method_that_cannot_run_in_a_layer_says_why(llama, ids):
    import kdecli.hf
    from kdecli.methods.exact import Exact

    class NotCausal(Exact):
        name = "not-causal"
        supports_causal = False

    with kdecli.hf.patch(llama, NotCausal(), layers=[2]):
        with pytest.raises(UsageError, match="not-causal cannot run in layer 2.*causal"):
            _logits(llama, ids)
