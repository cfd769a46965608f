"""``synthetic:n=4096,d=64,b=2,h=4,seed=0[,kind=gaussian|clustered][,nq=…][,dv=…]``: inputs without data.

gaussian:  q, k, v i.i.d. N(0, 1).
clustered: 16 centres per slice; q and k are a centre plus N(0, 0.3²) noise (k shares the
           centres of q), v i.i.d. N(0, 1): peaked attention that rewards LSH-based methods.
Defaults: n = 1024, d = 64, b = h = 1, seed 0, gaussian; nq = n and dv = d unless given.
"""

from __future__ import annotations

from typing import Any

import torch

from kdecli.errors import UsageError
from kdecli.qkv import QKV
from kdecli.sources.base import InputOptions, InputSource, Loaded
from kdecli.sources.registry import load_input, register

SYNTHETIC_DEFAULTS = {"n": 1024, "d": 64, "b": 1, "h": 1, "seed": 0, "kind": "gaussian"}


@register
class Synthetic(InputSource):
    name = "synthetic"
    summary = "Random Q, K, V: gaussian, or clustered like word vectors; for scaling studies."
    form = "synthetic:n=…,d=…[,b=…,h=…,seed=…,kind=gaussian|clustered]"

    def read(self, spec: str, options: InputOptions) -> Loaded:
        q, k, v = synthetic_tensors(spec)
        return Loaded(q, k, v, name=f"synthetic:{spec}")


def synthetic(spec: str) -> QKV:
    """``load_input("synthetic:…")``; the prefix may be left out."""
    return load_input(spec if spec.startswith("synthetic:") else f"synthetic:{spec}")


def synthetic_tensors(body: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V for the options ``n=…,d=…,…`` (module docstring)."""
    options: dict[str, Any] = dict(SYNTHETIC_DEFAULTS)
    for item in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in {*SYNTHETIC_DEFAULTS, "nq", "dv"}:
            raise UsageError(
                f"synthetic input: cannot read {item!r}; expected key=value with keys "
                "n, nq, d, dv, b, h, seed, kind."
            )
        if key == "kind":
            if value not in ("gaussian", "clustered"):
                raise UsageError(
                    f"synthetic input: kind must be gaussian or clustered; got {value!r}."
                )
            options[key] = value
        else:
            try:
                options[key] = int(value)
            except ValueError:
                raise UsageError(
                    f"synthetic input: {key} must be an integer; got {value!r}."
                ) from None
            if options[key] < (0 if key == "seed" else 1):
                raise UsageError(f"synthetic input: {key} must be positive; got {value}.")
    b, h, n, d = options["b"], options["h"], options["n"], options["d"]
    n_q, d_v = options.get("nq", n), options.get("dv", d)
    gen = torch.Generator().manual_seed(options["seed"])
    if options["kind"] == "gaussian":
        q = torch.randn(b, h, n_q, d, generator=gen)
        k = torch.randn(b, h, n, d, generator=gen)
    else:
        centres = torch.randn(b, h, 16, d, generator=gen) * 2
        q = _around(centres, n_q, gen)
        k = _around(centres, n, gen)
    v = torch.randn(b, h, n, d_v, generator=gen)
    return q, k, v


def _around(centres: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    b, h, c, d = centres.shape
    which = torch.randint(0, c, (b, h, n), generator=gen)
    picked = torch.gather(centres, 2, which.unsqueeze(-1).expand(b, h, n, d))
    return picked + 0.3 * torch.randn(b, h, n, d, generator=gen)
