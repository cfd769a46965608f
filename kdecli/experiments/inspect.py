"""What an attention input looks like before anything is approximated: ``kdecli inspect``.

Per batch×head slice, with logits ℓ = s·QKᵀ and P = D⁻¹A = softmax(ℓ) row by row:
- shapes and dtypes; ‖Q‖_F, ‖K‖_F, ‖V‖_F and the largest row norm of each;
- the logit range (min, max over the visible entries);
- the entropy of each attention row, H_i = −Σ_j P_ij log P_ij in nats (mean and min over rows);
  uniform attention reaches log n_k, one-hot attention 0;
- the mass of each row in its top 1% of keys (at least one key; mean and min over rows); uniform
  attention gives ⌈0.01·n_k⌉/n_k, one-hot 1;
- ‖O‖₂ against ‖D⁻¹A‖₂‖V‖₂ (O = PV; ‖D⁻¹A‖₂ by the chunked power iteration of
  ``kdecli.measure.reference``, to a relative change of 1e-4): when their ratio is small (< 0.1),
  rel_spectral = ‖Õ−O‖₂/‖O‖₂ exaggerates every method's error and bound_normalized is the fair
  figure (docs/metrics.md);
- the overflow risk of a naive exp(ℓ): max |ℓ| against log(float32 max) ≈ 88.72 (bfloat16 has the
  same range) and log(float16 max) ≈ 11.09.  Max-subtracted softmax is safe either way; estimators
  that exponentiate raw logits or feature maps of them are not.
Everything is computed in float64, in query chunks sized to a memory budget (the chunked softmax of
``kdecli.measure.reference``), so no n_q × n_k matrix is ever held.
"""

from __future__ import annotations

import json
import math
from typing import Any, TextIO

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kdecli import __version__
from kdecli.devices import resolve_device
from kdecli.errors import UsageError
from kdecli.masks import FULL, Mask
from kdecli.measure.environment import describe_input, environment
from kdecli.measure.metrics import spectral_norm
from kdecli.measure.reference import (
    DEFAULT_MEMORY_BYTES,
    attention_spectral_norm,
    chunk_rows,
    iter_softmax_chunks,
)
from kdecli.measure.setting import resolve_mask
from kdecli.qkv import QKV
from kdecli.records import KIND

TOP_FRACTION = 0.01
NORM_TOL = 1e-4  # power iteration for ‖D⁻¹A‖₂: relative change per step; ample for a ratio
RATIO_WARNING = 0.1
EXP_LIMITS = {
    name: math.log(torch.finfo(dtype).max)
    for name, dtype in (
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
    )
}
FORMATS = ("table", "json")


def top_keys(n_k: int) -> int:
    """How many keys make up a row's top 1% (at least one)."""
    return max(1, math.ceil(TOP_FRACTION * n_k))


def logit_range(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    *,
    mask: Mask = FULL,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of s·QKᵀ per slice, (b, h) float64 each, over the entries ``mask`` lets a
    query see, chunked."""
    q64, k_t = q.to(torch.float64), k.to(torch.float64).transpose(-1, -2)
    b, h, n_q, _ = q.shape
    n_k = k.shape[-2]
    low = torch.full((b, h), math.inf, dtype=torch.float64, device=q.device)
    high = torch.full((b, h), -math.inf, dtype=torch.float64, device=q.device)
    step = chunk_rows(b * h, n_k, memory_bytes)
    for start in range(0, n_q, step):
        stop = min(n_q, start + step)
        logits = (q64[..., start:stop, :] * scale) @ k_t
        allowed = mask.rows(start).allowed(stop - start, n_k, q.device)
        if allowed is not None:
            hidden = ~allowed
            high = torch.maximum(high, logits.masked_fill(hidden, -math.inf).amax((-2, -1)))
            low = torch.minimum(low, logits.masked_fill_(hidden, math.inf).amin((-2, -1)))
        else:
            high = torch.maximum(high, logits.amax((-2, -1)))
            low = torch.minimum(low, logits.amin((-2, -1)))
    return low, high


def attention_row_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    mask: Mask = FULL,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> dict[str, torch.Tensor]:
    """One chunked pass over P (under ``mask``): row entropy (mean, min), top-1% mass (mean,
    min), and O = PV."""
    b, h, n_q, _ = q.shape
    n_k = k.shape[-2]
    top = top_keys(n_k)
    v64 = v.to(torch.float64)
    out = torch.empty(b, h, n_q, v.shape[-1], dtype=torch.float64, device=q.device)
    sums = {
        name: torch.zeros(b, h, dtype=torch.float64, device=q.device) for name in ("entropy", "top")
    }
    mins = {
        name: torch.full((b, h), math.inf, dtype=torch.float64, device=q.device)
        for name in ("entropy", "top")
    }
    for start, stop, probs in iter_softmax_chunks(
        q, k, scale, mask=mask, memory_bytes=memory_bytes
    ):
        out[..., start:stop, :] = probs @ v64
        rows = {
            "entropy": 0.0 - torch.special.xlogy(probs, probs).sum(-1),  # 0.0 -: no -0.0
            "top": probs.topk(top, dim=-1, sorted=False).values.sum(-1),
        }
        for name, values in rows.items():
            sums[name] += values.sum(-1)
            mins[name] = torch.minimum(mins[name], values.amin(-1))
    return {
        "entropy_mean": sums["entropy"] / n_q,
        "entropy_min": mins["entropy"],
        "top_mass_mean": sums["top"] / n_q,
        "top_mass_min": mins["top"],
        "output": out,
    }


def _norms(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "frobenius": torch.linalg.matrix_norm(x, "fro"),
        "max_row_norm": x.norm(dim=-1).amax(-1),
    }


def inspect_input(
    qkv: QKV,
    *,
    scale: float | None = None,
    causal: bool = False,
    query_offset: int | None = None,
    mask: Mask | None = None,
    device: str | torch.device = "auto",
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> dict[str, Any]:
    """Statistics of ``qkv`` per batch×head slice and over all slices, as a JSON-ready dict.

    The mask: ``mask``, else the causal flag and query offset as the command line gives them
    (``kdecli.measure.setting.resolve_mask``: causal queries default to the last n_q of the
    n_k positions)."""
    softmax_scale = qkv.scale(scale)
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise UsageError(f"--scale must be a positive number; got {softmax_scale}.")
    b, h, n_q, _ = qkv.q.shape
    n_k = qkv.k.shape[-2]
    if mask is None:
        mask = resolve_mask(causal, query_offset, n_q, n_k)
    mask.check(n_q, n_k)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    data = qkv.to(device, torch.float64)
    q, k, v = data.q, data.k, data.v

    norms = {name: _norms(t) for name, t in (("q", q), ("k", k), ("v", v))}
    low, high = logit_range(q, k, softmax_scale, mask=mask, memory_bytes=memory_bytes)
    rows = attention_row_stats(q, k, v, softmax_scale, mask=mask, memory_bytes=memory_bytes)
    output_norm = spectral_norm(rows.pop("output"))
    value_norm = spectral_norm(v)
    attention_norm = attention_spectral_norm(
        q,
        k,
        softmax_scale,
        mask=mask,
        tol=NORM_TOL,
        generator=torch.Generator().manual_seed(0),
        memory_bytes=memory_bytes,
    )
    denominator = attention_norm * value_norm
    max_abs = torch.maximum(low.abs(), high.abs())

    def at(t: torch.Tensor, i: int, j: int) -> float:
        return float(t[i, j])

    slices = []
    for i in range(b):
        for j in range(h):
            den = at(denominator, i, j)
            slices.append(
                {
                    "batch": i,
                    "head": j,
                    **{
                        name: {key: at(t, i, j) for key, t in stats.items()}
                        for name, stats in norms.items()
                    },
                    "logits": {
                        "min": at(low, i, j),
                        "max": at(high, i, j),
                        "max_abs": at(max_abs, i, j),
                    },
                    "entropy": {
                        "mean": at(rows["entropy_mean"], i, j),
                        "min": at(rows["entropy_min"], i, j),
                    },
                    "top_mass": {
                        "mean": at(rows["top_mass_mean"], i, j),
                        "min": at(rows["top_mass_min"], i, j),
                    },
                    "output_norm": at(output_norm, i, j),
                    "attention_norm": at(attention_norm, i, j),
                    "value_norm": at(value_norm, i, j),
                    "attention_value_norm": den,
                    "output_ratio": at(output_norm, i, j) / den if den > 0 else None,
                    "exp_overflow": {
                        name: at(max_abs, i, j) > limit for name, limit in EXP_LIMITS.items()
                    },
                }
            )
    doc = {
        KIND: "inspect",  # "report": "inspect" before kdecli 0.8
        "schema_version": 1,
        "kdecli_version": __version__,
        "environment": environment(device, torch.float64).to_dict(),
        "input": describe_input(qkv, softmax_scale, mask).to_dict(),
        "dtypes": {
            name: str(t.dtype).removeprefix("torch.")
            for name, t in (("q", qkv.q), ("k", qkv.k), ("v", qkv.v))
        },
        "reference": {
            "log_n_k": math.log(n_k),
            "top_fraction": TOP_FRACTION,
            "top_keys": top_keys(n_k),
            "uniform_top_mass": top_keys(n_k) / n_k,
            "exp_limits": EXP_LIMITS,
            "output_ratio_warning": RATIO_WARNING,
            "attention_norm_tol": NORM_TOL,
        },
        "slices": slices,
        "summary": summarize_slices(slices),
    }
    doc["warnings"] = warnings(doc)
    return doc


def summarize_slices(slices: list[dict[str, Any]]) -> dict[str, Any]:
    """{mean, min, max} over slices of every number; the count of slices where a flag is true."""

    def merge(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, dict):
            return {key: merge([v[key] for v in values]) for key in first}
        if isinstance(first, bool):
            return sum(values)
        numbers = [v for v in values if v is not None]
        if not numbers:
            return None
        return {"mean": sum(numbers) / len(numbers), "min": min(numbers), "max": max(numbers)}

    return merge([{k: v for k, v in s.items() if k not in ("batch", "head")} for s in slices])


def warnings(doc: dict[str, Any]) -> list[str]:
    """Plain-language notes on what the statistics mean for an error report."""
    slices, total = doc["slices"], len(doc["slices"])
    notes = []
    small = [
        s["output_ratio"]
        for s in slices
        if s["output_ratio"] is not None and s["output_ratio"] < RATIO_WARNING
    ]
    if small:
        notes.append(
            f"‖O‖₂ / (‖D⁻¹A‖₂‖V‖₂) is below {RATIO_WARNING} in {len(small)} of {total} slices (as low "
            f"as {min(small):.3g}): the output is small against what attention could produce, so "
            "rel_spectral will exaggerate every method's error; bound_normalized "
            "(`kdecli compare --bound`) is the fair figure here."
        )
    worst = max(s["logits"]["max_abs"] for s in slices)
    for name in ("float32", "float16"):
        count = sum(s["exp_overflow"][name] for s in slices)
        if count:
            also = " (and bfloat16, which shares its range)" if name == "float32" else ""
            notes.append(
                f"max |logit| {worst:.4g} exceeds log({name} max) ≈ {EXP_LIMITS[name]:.2f} in {count} "
                f"of {total} slices: a naive exp(logit) overflows in {name}{also}; max-subtracted "
                "softmax is safe, estimators that exponentiate raw logits are not."
            )
            break  # float32 overflow implies float16's
    return notes


# ---- rendering ----------------------------------------------------------------------------------


def _g(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def render_table(doc: dict[str, Any], console: Console, max_slices: int = 32) -> None:
    inp, ref, env = doc["input"], doc["reference"], doc["environment"]
    shape = inp["shape"]
    dtypes = doc["dtypes"]
    dtype_text = (
        dtypes["q"]
        if len(set(dtypes.values())) == 1
        else ", ".join(f"{k.upper()} {v}" for k, v in dtypes.items())
    )
    title = (
        f"{inp['source']}  b={shape['b']} h={shape['h']} n_q={shape['n_q']} n_k={shape['n_k']} "
        f"d={shape['d']} d_v={shape['d_v']}  {dtype_text}  scale={inp['scale']:.6g}"
        + ("  causal" if inp["causal"] else "")
    )
    table = Table(title=Text(title), title_justify="left")  # the source is user text: no markup
    for column in (
        "slice",
        "‖Q‖_F / max row",
        "‖K‖_F / max row",
        "‖V‖_F / max row",
        "logits min … max",
        "entropy mean / min",
        f"top 1% ({ref['top_keys']} keys) mass mean / min",
        "‖O‖₂",
        "‖D⁻¹A‖₂‖V‖₂",
        "ratio",
    ):
        table.add_column(column, justify="left" if column == "slice" else "right")

    def cells(label: str, s: dict[str, Any], pick=lambda x: x) -> list[str]:
        def pair(a, b):
            return f"{_g(pick(a))} / {_g(pick(b))}"

        return [
            label,
            *(pair(s[n]["frobenius"], s[n]["max_row_norm"]) for n in ("q", "k", "v")),
            f"{_g(pick(s['logits']['min']))} … {_g(pick(s['logits']['max']))}",
            pair(s["entropy"]["mean"], s["entropy"]["min"]),
            pair(s["top_mass"]["mean"], s["top_mass"]["min"]),
            _g(pick(s["output_norm"])),
            _g(pick(s["attention_value_norm"])),
            _g(pick(s["output_ratio"]), 3),
        ]

    slices = doc["slices"]
    shown = slices[:max_slices]
    for index, s in enumerate(shown):
        style = (
            "yellow"
            if s["output_ratio"] is not None and s["output_ratio"] < RATIO_WARNING
            else None
        )
        table.add_row(
            *cells(f"b{s['batch']} h{s['head']}", s),
            style=style,
            end_section=index == len(shown) - 1,
        )
    if len(slices) > 1:
        summary = doc["summary"]
        for stat in ("mean", "min", "max"):
            table.add_row(
                *cells(
                    f"{stat} over slices",
                    summary,
                    lambda x, stat=stat: None if x is None else x[stat],
                ),
                style="bold",
            )
    console.print(table)
    if len(slices) > max_slices:
        console.print(f"({len(slices) - max_slices} more slices: --format json lists every one.)")
    overflow = (
        doc["summary"]["exp_overflow"]
        if len(slices) > 1
        else {k: int(v) for k, v in slices[0]["exp_overflow"].items()}
    )
    worst = max(s["logits"]["max_abs"] for s in slices)
    console.print(
        f"entropy in nats; uniform attention: log n_k = {ref['log_n_k']:.4g}, top-{ref['top_keys']} "
        f"({ref['top_fraction']:.0%} of keys) mass {ref['uniform_top_mass']:.4g}; one-hot: 0 and 1.",
        highlight=False,
    )
    console.print(
        f"max |logit| {worst:.4g}; a naive exp overflows above {EXP_LIMITS['float32']:.2f} in float32 "
        f"and bfloat16 ({overflow['float32']}/{len(slices)} slices over) and above "
        f"{EXP_LIMITS['float16']:.2f} in float16 ({overflow['float16']}/{len(slices)}).",
        highlight=False,
    )
    console.print(
        f"ratio = ‖O‖₂ / (‖D⁻¹A‖₂‖V‖₂); below {RATIO_WARNING} rel_spectral exaggerates errors. "
        f"Computed in float64 on {env['device']}.",
        highlight=False,
    )


def render(doc: dict[str, Any], fmt: str, stream: TextIO, *, width: int | None = None) -> None:
    if fmt == "json":
        from kdecli.records import clean

        stream.write(json.dumps(clean(doc), indent=2, allow_nan=False) + "\n")
    elif fmt == "table":
        if width is None and not stream.isatty():
            width = 200
        render_table(doc, Console(file=stream, width=width, soft_wrap=False))
    else:
        raise ValueError(fmt)
