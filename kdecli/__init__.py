"""kdecli: how far is an attention approximation from exact softmax attention, and how fast is it?

Library use::

    import kdecli
    qkv = kdecli.load_input("sample:glove")
    report = kdecli.compare(qkv, methods=["kdeformer", "performer"], budgets=[64, 256], seeds=3)
    out = kdecli.attention(q, k, v, method="kdeformer", budget=256)   # drop-in for SDPA

Importing kdecli changes no process state, and imports torch only when a name below is first used
(so ``kdecli.enable_huge_pages()`` can still come first; see ``kdecli.tuning``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from kdecli.tuning import enable_huge_pages

__version__ = "0.9.0"

_LAZY = {
    "attention": "kdecli.api",
    "QKV": "kdecli.qkv",
    "load_input": "kdecli.sources",
    "RunConfig": "kdecli.measure.config",
    "approx": "kdecli.experiments.compare.run",
    "compare": "kdecli.experiments.compare.run",
    "compare_layers": "kdecli.experiments.compare.run",
    "plan_grid": "kdecli.experiments.compare.plan",
    "merge_reports": "kdecli.sweeps.merge",
    "run_on_ray": "kdecli.sweeps.ray_executor",
    "load_inputs": "kdecli.sources",
    "RunReport": "kdecli.experiments.compare.records",
    "load_document": "kdecli.experiments.compare.records",
    "load_any": "kdecli.experiments.documents",
}

__all__ = [*_LAZY, "enable_huge_pages", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdecli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
