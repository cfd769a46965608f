"""Gradients in use: the fast path without autograd, and fine-tuning a model through
``kdecli.hf.patch``.  Correctness of every method's gradients (gradcheck, large logits, both paths
agreeing) is in the contract battery."""

from __future__ import annotations

import pytest
import torch

import kdecli.methods.kdeformer as kdeformer_module
import kdecli.methods.reformer as reformer_module
from kdecli.methods import make_method
from tests._models import build, needs_hf
from tests.conftest import gen, make_qkv


@pytest.mark.parametrize(
    "module, name", [(kdeformer_module, "kdeformer"), (reformer_module, "reformer")]
)
def test_without_autograd_the_in_place_path_runs(monkeypatch, module, name):
    """The methods with two paths ask ``needs_grad`` which to take: inference must get the fast
    in-place one (what the speed benchmarks measure), autograd the out-of-place one."""
    seen = []
    real = module.needs_grad
    monkeypatch.setattr(module, "needs_grad", lambda *t: seen.append(real(*t)) or seen[-1])
    q, k, v = make_qkv(1, 2, 200, 200, 16)
    method = make_method(name, 32)
    with torch.no_grad():
        method(q, k, v, generator=gen(0))
    assert seen and not any(seen)
    seen.clear()
    method(q.requires_grad_(), k, v, generator=gen(0))
    assert seen and all(seen)


@pytest.mark.parametrize("name", ["exact", "kdeformer", "performer", "reformer"])
def test_a_method_without_its_gradient_is_refused_in_its_reasons(name):
    q, k, v = make_qkv(1, 1, 64, 64, 8)
    q.requires_grad_()
    assert make_method(name, 16 if name != "exact" else None).not_supported_reasons(q, k, v) == []
    assert make_method("rankk", 16).not_supported_reasons(q, k, v) == [
        "does not support autograd (no backward pass)"
    ]
    (reason,) = make_method("kdeformer", 16, sampling="column-norm").not_supported_reasons(q, k, v)
    assert "column-norm" in reason
    with torch.no_grad():  # no graph is recorded: nothing to refuse
        assert make_method("rankk", 16).not_supported_reasons(q, k, v) == []


@needs_hf
@pytest.mark.parametrize("method", ["kdeformer", "performer"])
def test_fine_tuning_through_patch_lowers_the_loss(method):
    """A tiny Llama (GQA, RoPE, random weights) in training mode, the method in two of its three
    layers: twenty AdamW steps on one batch of next-token prediction, and the loss falls."""
    import kdecli.hf

    model = build("llama").train()
    ids = torch.randint(2, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    with kdecli.hf.patch(model, method, budget=8, layers=[1, 2], seed=0):
        for _ in range(20):
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
    grads = [p.grad for p in model.model.layers[1].self_attn.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
