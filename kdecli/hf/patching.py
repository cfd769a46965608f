"""``kdecli.hf.patch``: a model with an approximation method in chosen attention layers, for any code.

::

    import kdecli.hf
    with kdecli.hf.patch(model, "kdeformer", budget=128, layers=[3, 4, 5], seed=0):
        model.generate(ids, max_new_tokens=20)      # or a benchmark harness, an eval loop

Inside the block, each chosen layer computes Õ = method(Q, K, V; s) on the query, key and value
the model made (after the projections and RoPE; grouped-query keys and values repeated to the
query heads), with the layer's own scale s and the layer's mask as a ``kdecli.masks`` value
(``AttentionCall.positions``: a causal layer's queries are the last n_q of its n_k positions);
every other layer runs stock SDPA.
Afterwards the model's previous attention implementation is back, so its outputs are
bit-identical to those before the block (also when the block raises).

Phases: ``phase="decode"`` runs the method only in calls that have a past (fewer queries than
keys: the decode steps of a ``generate`` loop, over the model's own KV cache object, which is never
copied), ``phase="prefill"`` only in calls without one (the prompt's forward), ``"both"`` (the
default) in every call; a call outside the phase runs stock SDPA.  The decision is made from what
the attention function receives (``AttentionCall.is_decode_step``), so it holds for any loop.

Randomness: the i-th call of layer l draws from its own ``torch.Generator`` seeded from
(seed, method, l, i), on the device of the tensors: the same seed and the same calls give the same
outputs, and a layer's draws do not depend on which other layers are patched.

What the handler refuses, with a one-line ``UsageError`` (the methods compute plain
softmax(s·QKᵀ)V, with no mask): a mask that is not the plain full or causal pattern (padding, a
narrow sliding window), extra score terms (ALiBi, soft caps, sinks), dropout (training mode), and
whatever the method itself refuses on the call's shape and mask.  A decode step with a KV cache
has n_q queries against every cached key, under ``Causal(n_k − n_q)``: with one query (the last
position) causal attention is full attention over the keys, and the method runs non-causally, as
before; several queries (speculative decoding, a chunked prefill) run under the offset mask.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kdecli.errors import ParameterError, UsageError
from kdecli.hf.interface import (
    AttentionCall,
    AttentionFunction,
    attention_function,
    extra_terms,
    mask_problem,
    not_routed,
    use_attention,
)
from kdecli.masks import Mask
from kdecli.measure.seeds import derive_seed
from kdecli.methods import AttentionMethod, make_method

PHASES = ("both", "prefill", "decode")


def check_phase(phase: str) -> str:
    """``phase`` when it is one of ``PHASES``, else a one-line ``UsageError``."""
    if phase not in PHASES:
        raise UsageError(f"phase must be one of {', '.join(PHASES)}; got {phase!r}.")
    return phase


def resolve_method(
    method: str | AttentionMethod, budget: int | None, params: Mapping[str, Any] | None
) -> AttentionMethod:
    """A method instance from a registered name, budget and parameters (or the instance given)."""
    if isinstance(method, AttentionMethod):
        if params:
            raise UsageError(
                f"patch: `params` goes with a method name; {method.name} is already built "
                f"({method!r})."
            )
        return method
    if not isinstance(method, str):
        raise UsageError(
            f"patch: `method` must be a method name or an AttentionMethod; got {method!r}."
        )
    return make_method(method, budget, **dict(params or {}))  # UsageError / ParameterError


@dataclass
class LayerMethod:
    """The handler of every patched layer: the method on the call's q, k, v (see the module doc).

    Kept lean on purpose (the overhead of ``exact`` through it is the cost of the hook itself): the
    support check is cached per shape, the mask check per mask object (a forward hands the same
    mask to every layer), and a generator is made only for a randomized method."""

    method: AttentionMethod
    seed: int = 0
    phase: str = "both"  # which calls the method runs in (module doc); the others run stock
    calls: dict[int, int] = field(default_factory=dict)  # layer -> calls so far (the seed index)
    # "prefill" / "decode" -> calls that ran the method, and calls left stock (outside the phase)
    approximated: dict[str, int] = field(default_factory=dict)
    left_stock: dict[str, int] = field(default_factory=dict)
    _supported: dict[tuple, str | None] = field(default_factory=dict, repr=False)
    _plain_mask: Any = field(default=None, repr=False)  # weakref to the last mask found plain

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        kind = "decode" if call.is_decode_step else "prefill"
        if self.phase not in ("both", kind):
            self.left_stock[kind] = self.left_stock.get(kind, 0) + 1
            return call.stock()
        self.approximated[kind] = self.approximated.get(kind, 0) + 1
        query, key, value = call.query, call.key, call.value
        n_q, n_k = query.shape[-2], key.shape[-2]
        try:
            positions = call.positions
        except UsageError as error:
            raise UsageError(f"layer {call.layer}: {error.message}") from None
        self._check_plain(call, n_q, n_k, positions)
        if call.groups != 1:
            key, value = call.expanded_kv()
        shape = (n_q, n_k, query.shape[-1], value.shape[-1], positions)
        if shape not in self._supported:
            reasons = self.method.not_supported_reasons(query, key, value, positions)
            self._supported[shape] = "; ".join(reasons) if reasons else None
        if self._supported[shape] is not None:
            raise UsageError(
                f"{self.method.name} cannot run in layer {call.layer} "
                f"({n_q} queries, {n_k} keys): {self._supported[shape]}."
            )
        generator = None
        if self.method.randomized:
            index = self.calls.get(call.layer, 0)
            self.calls[call.layer] = index + 1
            generator = torch.Generator(device=query.device)
            generator.manual_seed(
                derive_seed(self.seed, f"{self.method.name}@{call.layer}#{index}")
            )
        return self.method(query, key, value, scale=call.scale, generator=generator, mask=positions)

    def _check_plain(self, call: AttentionCall, n_q: int, n_k: int, positions: Mask) -> None:
        where = f"layer {call.layer}"
        extra = extra_terms(call)
        if extra:
            raise UsageError(
                f"{where} adds {', '.join(extra)} to its attention scores; kdecli methods "
                "compute plain softmax(s·QKᵀ)V."
            )
        if call.dropout:
            raise UsageError(
                f"{where}: attention dropout {call.dropout} (a model in training mode); kdecli "
                "methods have no dropout. Call model.eval() first."
            )
        mask = call.mask
        if mask is None or (self._plain_mask is not None and self._plain_mask() is mask):
            return
        problem = mask_problem(mask, n_q, n_k, positions)
        if problem is not None:
            raise UsageError(
                f"{where}: the attention mask {problem}; kdecli methods take no mask: run "
                "unpadded sequences (one at a time, or a batch of equal lengths)."
            )
        self._plain_mask = weakref.ref(mask)


@dataclass
class Patch:
    """A method bound to some layers of a model, ready to apply (``with p.applied(): ...``).
    ``handler.calls`` carries on across applications, so chunks run one after another draw
    fresh randomness, as they would inside one ``patch`` block."""

    model: torch.nn.Module
    method: AttentionMethod
    layers: list[int]
    handler: LayerMethod
    function: AttentionFunction

    @contextlib.contextmanager
    def applied(self) -> Iterator[Patch]:
        with use_attention(self.model, self.function):
            yield self

    def check_routed(self) -> None:
        """After a run: a ``UsageError`` when a patched layer never called the registered
        attention function (the architecture, not the method: no figure would mean anything)."""
        missing = [layer for layer in self.layers if not self.function.calls.get(layer)]
        if not missing:
            return
        if not self.function.calls:
            raise not_routed(self.model, "no layer called the registered attention function")
        raise UsageError(
            f"layers {', '.join(map(str, missing))} never called the registered attention "
            "function; this architecture routes only some of its attention through transformers' "
            "AttentionInterface."
        )


def prepare(
    model: torch.nn.Module,
    method: str | AttentionMethod = "kdeformer",
    budget: int | None = 128,
    layers: str | Sequence[int] | None = None,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
    phase: str = "both",
) -> Patch:
    """Check everything ``patch`` is given (method, budget, parameters, layers, seed, phase) and
    bind it, without touching the model."""
    from kdecli.hf.text import n_layers, parse_layers

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ParameterError(f"patch: `seed` must be an integer; got {seed!r}.")
    check_phase(phase)
    built = resolve_method(method, budget, params)
    if built.needs_prompt_queries:  # a one-step call holds no prompt queries to choose from
        raise UsageError(
            f"patch: {built.name} cannot run inside a model: it chooses its cache from the "
            "prompt's queries, which a model's attention call does not pass on; measure it "
            "with compare --phase decode."
        )
    chosen = parse_layers(layers, n_layers(model.config))
    handler = LayerMethod(built, seed, phase)
    function = attention_function(dict.fromkeys(chosen, handler))
    return Patch(model, built, chosen, handler, function)


@contextlib.contextmanager
def patch(
    model: torch.nn.Module,
    method: str | AttentionMethod = "kdeformer",
    budget: int | None = 128,
    layers: str | Sequence[int] | None = None,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
    phase: str = "both",
) -> Iterator[Patch]:
    """Run the block with ``method`` (a name from ``kdecli methods`` with its ``budget`` and
    ``params``, or an ``AttentionMethod``) in ``layers`` (indices, ``"0,3-5"``, None = all) of a
    transformers ``model``, in the calls of ``phase`` ("both", "prefill": calls without a past,
    "decode": calls with one); every other call and layer, and the whole model afterwards, runs
    stock.

    Bad names, budgets, parameters and layers raise ``UsageError`` / ``ParameterError`` before
    the model runs; see the module doc for what a patched layer refuses while it runs."""
    bound = prepare(model, method, budget, layers, seed, params, phase)
    with bound.applied():
        yield bound
