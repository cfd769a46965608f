"""Hugging Face models through their AttentionInterface: capture q, k, v and o; patch; drift.

``pip install 'kdecli[hf]'`` adds ``transformers`` (and ``gguf`` for ``.gguf`` files).  Importing
this package does not import transformers; the first function that needs it does, and says how to
install it when it is missing.  Library use::

    from kdecli.hf import capture, drift, patch
    summary = capture("my-model/", "text.txt", tokens=512, chunks=4, output="cap.h5")
    report = drift("my-model/", "text.txt", methods=["kdeformer"], budgets=[64, 128])
    with patch(model, "kdeformer", budget=128, layers=[3, 4, 5]):
        model.generate(ids, max_new_tokens=20)
    with patch(model, "topk", budget=128, phase="decode"):   # the decode steps only
        model.generate(ids, max_new_tokens=20)

One function registered under the name ``kdecli`` (``kdecli.hf.interface``) receives every layer's
query, key and value after the projections and RoPE, and returns the attention output; what it does
in a layer is a dispatch on the layer's index (``attention_function``), so a capture and, later, a
method run inside the model share the same registration.

The modules behind ``patch`` and ``drift`` are ``patching`` and ``kdecli.experiments.drift.run``: a submodule named
like the function it exports would replace that function on this package once imported
(Python sets ``kdecli.hf.<submodule>`` on import), and ``kdecli.hf.patch(model)`` would then be a
module.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "capture": "kdecli.hf.capturing",
    "CaptureSummary": "kdecli.hf.capturing",
    "parse_layers": "kdecli.hf.text",
    "AttentionCall": "kdecli.hf.interface",
    "attention_function": "kdecli.hf.interface",
    "use_attention": "kdecli.hf.interface",
    "NAME": "kdecli.hf.interface",
    "load_model": "kdecli.hf.models",
    "load_tokenizer": "kdecli.hf.models",
    "patch": "kdecli.hf.patching",
    "Patch": "kdecli.hf.patching",
    "drift": "kdecli.experiments.drift.run",
    "DriftReport": "kdecli.experiments.drift.records",
    "DriftResult": "kdecli.experiments.drift.records",
    "load_drift": "kdecli.experiments.drift.records",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdecli.hf' has no attribute {name!r}")
