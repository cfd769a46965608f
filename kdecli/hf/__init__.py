"""Hugging Face models through their AttentionInterface: capture each layer's q, k, v and o.

``pip install 'kdecli[hf]'`` adds ``transformers`` (and ``gguf`` for ``.gguf`` files).  Importing
this package does not import transformers; the first function that needs it does, and says how to
install it when it is missing.  Library use::

    from kdecli.hf import capture
    summary = capture("my-model/", "text.txt", tokens=512, chunks=4, output="cap.h5")

One function registered under the name ``kdecli`` (``kdecli.hf.interface``) receives every layer's
query, key and value after the projections and RoPE, and returns the attention output; what it does
in a layer is a dispatch on the layer's index (``attention_function``), so a capture and, later, a
method run inside the model share the same registration.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "capture": "kdecli.hf.capture",
    "CaptureSummary": "kdecli.hf.capture",
    "parse_layers": "kdecli.hf.capture",
    "AttentionCall": "kdecli.hf.interface",
    "attention_function": "kdecli.hf.interface",
    "use_attention": "kdecli.hf.interface",
    "NAME": "kdecli.hf.interface",
    "load_model": "kdecli.hf.models",
    "load_tokenizer": "kdecli.hf.models",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdecli.hf' has no attribute {name!r}")
