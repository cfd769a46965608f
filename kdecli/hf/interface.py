"""The one attention function kdecli registers with transformers, and its per-layer dispatch.

transformers' attention modules compute q, k and v (projections, RoPE, the cache) and then call
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value, attention_mask,
scaling=..., dropout=..., **kwargs)``, which returns the output as (b, n, h, d_v).  kdecli registers
one such function under the name ``kdecli`` (with the stock SDPA mask function under the same name:
without a mask function of its own name, padding masks arrive as None).  It builds an
``AttentionCall`` and hands it to the handler for that layer, or runs stock SDPA where there is none::

    fn = attention_function({0: record, 3: record})      # layer index -> handler
    with use_attention(model, fn):
        model(input_ids)

A handler takes an ``AttentionCall`` and returns the attention output in kdecli's layout,
(b, h, n, d_v); ``call.stock()`` is what the model would have computed.  Keys and values arrive as
the model made them: with grouped-query attention, ``h_kv`` heads, query head ``i`` reading
key/value head ``i // call.groups`` (``call.expanded_kv()`` repeats them).  The layer index is the
module's ``layer_idx``; a model whose attention modules carry none (ViT) gets its modules numbered
in the order they first run.  Nothing here patches a model class or hooks a projection.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kdecli.errors import UsageError
from kdecli.masks import FULL, Causal, Mask

NAME = "kdecli"
INSTALL_HINT = "pip install 'kdecli[hf]'"

Handler = Callable[["AttentionCall"], torch.Tensor]


def require_transformers():
    """The transformers module, or a usage error that says how to install it."""
    try:
        import transformers
    except ImportError:
        raise UsageError(
            "this needs Hugging Face transformers, which is not installed.",
            hint=f"Run `{INSTALL_HINT}`.",
        ) from None
    return transformers


@dataclass
class AttentionCall:
    """One layer's attention, as the model asked for it (q, k, v after projections and RoPE)."""

    module: torch.nn.Module
    layer: int
    query: torch.Tensor  # (b, h, n_q, d)
    key: torch.Tensor  # (b, h_kv, n_k, d)
    value: torch.Tensor  # (b, h_kv, n_k, d_v)
    mask: (
        torch.Tensor | None
    )  # what the model's mask function made: bool (True = attend) or additive
    scale: float  # the model's own `scaling` (GPT-2 may scale per layer: never recomputed)
    causal: bool
    dropout: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def positions(self) -> Mask:
        """Where the queries sit, as a mask (``kdecli.masks``): a causal module's queries are the
        last n_q of the n_k positions (``Causal.bottom_right``: prefill when n_q = n_k, a decode
        step or a chunk of a prefill against its cache otherwise); ``FULL`` for a bidirectional
        one.  A ``UsageError`` for a causal call with more queries than keys."""
        if not self.causal:
            return FULL
        return Causal.bottom_right(self.query.shape[-2], self.key.shape[-2])

    @property
    def is_decode_step(self) -> bool:
        """Whether the call has a past: fewer queries than keys, the keys before the queries'
        positions coming from the KV cache (a decode step, or a chunk of a prefill after the
        first).  A call without a past (the prompt's forward, an encoder's) is a prefill."""
        return self.query.shape[-2] < self.key.shape[-2]

    @property
    def groups(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.query.shape[1] // self.key.shape[1]

    def kv_head(self) -> torch.Tensor:
        """For each query head, the key/value head it reads (as transformers' ``repeat_kv``)."""
        return torch.arange(self.query.shape[1]) // self.groups

    def expanded_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values repeated to the query heads, (b, h, n_k, d)."""
        if self.groups == 1:
            return self.key, self.value
        return (
            self.key.repeat_interleave(self.groups, dim=1),
            self.value.repeat_interleave(self.groups, dim=1),
        )

    def stock(self) -> torch.Tensor:
        """The model's own attention (transformers' SDPA function), as (b, h, n_q, d_v)."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out, _ = sdpa_attention_forward(
            self.module,
            self.query,
            self.key,
            self.value,
            self.mask,
            dropout=self.dropout,
            scaling=self.scale,
            **self.kwargs,
        )
        return out.transpose(1, 2)


# kwargs of the attention call that add terms softmax(s·QKᵀ)V does not have
EXTRA_TERMS = ("position_bias", "softcap", "s_aux", "sinks")


def extra_terms(call: AttentionCall) -> list[str]:
    """The kwargs of ``call`` that add something to the scores (ALiBi-style biases, soft caps,
    attention sinks): softmax(s·QKᵀ)V with the call's scale cannot reproduce them."""
    return [name for name in EXTRA_TERMS if call.kwargs.get(name) is not None]


def mask_problem(mask: torch.Tensor | None, n_q: int, n_k: int, positions: Mask) -> str | None:
    """None when the model's ``mask`` allows exactly what ``positions`` (a ``kdecli.masks`` value,
    usually ``AttentionCall.positions``) allows — every key under ``FULL``, key j for query i iff
    j ≤ offset + i under ``Causal(offset)`` — else what is wrong with it, as a phrase ("is not
    the plain causal pattern …").  A bool mask is True where attention is allowed; an additive
    one is 0 there and very negative elsewhere."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask == 0
        if not (allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all():
            return "adds a bias to the scores"
    expected = positions.allowed(n_q, n_k, device=mask.device)
    if expected is None:
        expected = torch.ones(n_q, n_k, dtype=torch.bool, device=mask.device)
    if torch.equal(allowed.expand(*allowed.shape[:-2], n_q, n_k), expected.expand_as(allowed)):
        return None
    kind = "causal" if positions.is_causal else "full"
    return (
        f"is not the plain {kind} pattern (padding, or a sliding window narrower than the "
        f"{n_k} keys)"
    )


class AttentionFunction:
    """A function with transformers' attention signature that dispatches on the layer index.

    ``handlers`` maps a layer index to a handler, or is a callable ``layer -> handler or None``;
    layers without one run stock SDPA.  ``calls`` counts calls per layer (a capture checks that
    every layer it asked for ran through here)."""

    def __init__(self, handlers: Mapping[int, Handler] | Callable[[int], Handler | None]):
        self._lookup = handlers.get if isinstance(handlers, Mapping) else handlers
        self._order: dict[int, int] = {}  # id(module) -> index, for modules without layer_idx
        self.calls: dict[int, int] = {}

    def layer_of(self, module: torch.nn.Module) -> int:
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int):
            return index
        return self._order.setdefault(id(module), len(self._order))

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        layer = self.layer_of(module)
        self.calls[layer] = self.calls.get(layer, 0) + 1
        causal = kwargs.pop("is_causal", None)
        call = AttentionCall(
            module=module,
            layer=layer,
            query=query,
            key=key,
            value=value,
            mask=attention_mask,
            scale=float(query.shape[-1] ** -0.5 if scaling is None else scaling),
            causal=bool(getattr(module, "is_causal", True) if causal is None else causal),
            dropout=dropout,
            kwargs={**kwargs, **({} if causal is None else {"is_causal": causal})},
        )
        handler = self._lookup(layer)
        out = call.stock() if handler is None else handler(call)
        return out.transpose(1, 2).contiguous(), None


def attention_function(
    handlers: Mapping[int, Handler] | Callable[[int], Handler | None],
) -> AttentionFunction:
    """The registered function's behaviour for one use: a handler per layer (see the module doc)."""
    return AttentionFunction(handlers)


_ACTIVE: contextvars.ContextVar[AttentionFunction | None] = contextvars.ContextVar(
    "kdecli_attention", default=None
)


def _dispatch(module, query, key, value, attention_mask, **kwargs):
    active = _ACTIVE.get()
    if active is None:  # a model left on `kdecli` outside `use_attention`: behave as stock SDPA
        active = _STOCK
    return active(module, query, key, value, attention_mask, **kwargs)


_STOCK = AttentionFunction({})


def register() -> None:
    """Register ``kdecli`` with transformers' attention and mask interfaces (idempotent)."""
    require_transformers()
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, _dispatch)
    AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def use_attention(model: torch.nn.Module, function: AttentionFunction) -> Iterator[None]:
    """Run ``model`` with ``function`` in every attention layer for the duration of the block; the
    model's previous implementation comes back afterwards.  Raises ``UsageError`` for a model whose
    attention does not route through transformers' AttentionInterface."""
    register()
    previous = model.config._attn_implementation
    if previous != NAME:
        set_implementation(model, NAME)
    token = _ACTIVE.set(function)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        if previous != NAME:
            set_implementation(model, previous)


def set_implementation(model: torch.nn.Module, name: str) -> None:
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model.set_attn_implementation(name)
    except (KeyError, ValueError) as exc:
        raise not_routed(model, str(exc)) from None
    finally:
        logging.set_verbosity(verbosity)
    if model.config._attn_implementation != name:
        raise not_routed(model)


def not_routed(model: torch.nn.Module, detail: str = "") -> UsageError:
    kind = getattr(model.config, "model_type", type(model).__name__)
    extra = f" ({detail})" if detail else ""
    return UsageError(
        f"{type(model).__name__} (model type `{kind}`) does not route its attention through "
        f"transformers' AttentionInterface, so kdecli cannot see its q, k and v{extra}.",
        hint="Architectures that do include BERT, Llama, GPT-2, Qwen2, Mistral and ViT.",
    )
