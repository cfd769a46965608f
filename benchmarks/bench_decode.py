"""Decode: a step's time against exact attention's at 4k, 64k and 1M cached keys, and the error of
every method on decode rows of the bundled GloVe sample.  Prints its figures; asserts nothing.

    python benchmarks/bench_decode.py [--lengths 4096,65536,1048576] [--skip-million]
                                      [--methods ...] [--budget 256] [--steps 64]

1. Time: ``kdecli.experiments.scale.run.scale`` with ``phase="decode"`` on ``synthetic:d=64``
   (b·h = 1, float32): per cache length, one decode step (one query at the last position) of each
   method on a prepared cache, the preparation timed apart and amortised over ``--steps``, against
   ``scaled_dot_product_attention`` of the query over the whole cache, all in one run (the ratios
   are like for like), and the error of that step's row against its float64 reference.  Lengths up
   to 64k take the usual sampling (3 samples, 0.2 s at least); the 1M length one sample after one
   untimed call per method, since one call of the slowest methods there takes tens of seconds.
2. Error: ``compare`` of every method in the decode phase on ``sample:glove`` (the last 16 queries
   of each sequence, each over its own prefix) at budgets 64–1024, 3 seeds, with the floors
   (the ``mean`` baseline over each prefix, and the zero output).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from kdecli.experiments.compare.run import compare
from kdecli.experiments.scale.records import ScaleReport
from kdecli.experiments.scale.report import rows
from kdecli.experiments.scale.run import scale
from kdecli.measure.config import RunConfig
from kdecli.methods import get_method_class, method_names
from kdecli.sources import load_input

TIMED = "exact,mean,kdeformer,performer,reformer,scatterbrain,hyperattention,thinformer,nystromformer,uniform,topk"  # noqa: E501
BUDGETS = (64, 128, 256, 512, 1024)
QUERIES = 16  # decode rows per GloVe sequence in part 2


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    for unit, factor in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= factor:
            return f"{seconds / factor:.3g} {unit}"
    return f"{seconds / 1e-6:.3g} µs"


def fmt_x(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.3g}×"


def time_part(lengths: list[int], methods: list[str], budget: int, steps: int) -> None:
    print(f"\n1. decode step against SDPA's, synthetic:d=64 (b·h = 1, float32), budget {budget}, "
          f"preparation amortised over {steps} steps")  # fmt: skip
    usual = RunConfig(seeds=1, repeats=3, warmup=1, min_time=0.2, phase="decode", steps=steps)
    large = RunConfig(seeds=1, repeats=1, warmup=1, min_time=0.0, phase="decode", steps=steps)
    groups = [[n for n in lengths if n <= 65536], [n for n in lengths if n > 65536]]
    print(f"{'method':15s} {'n_k':>9s} {'step':>10s} {'exact':>10s} {'speed-up':>9s} "
          f"{'prepare':>10s} {'amortised':>10s} {'error':>9s}  status")  # fmt: skip
    for group, config in zip(groups, (usual, large)):
        if not group:
            continue
        started = time.perf_counter()
        report: ScaleReport = scale("synthetic:d=64", methods, budget, group, config)
        for row in sorted(rows(report), key=lambda r: (r.n, methods.index(r.method))):
            error = "—" if row.error is None else f"{row.error:.3g}"
            print(f"{row.method:15s} {row.n:>9,} {fmt_s(row.time_s):>10s} "
                  f"{fmt_s(row.exact_s):>10s} {fmt_x(row.speedup):>9s} "
                  f"{fmt_s(row.prepare_s):>10s} {fmt_x(row.amortised_speedup):>10s} "
                  f"{error:>9s}  {row.status}")  # fmt: skip
        print(f"   ({', '.join(f'{n:,}' for n in group)}: {time.perf_counter() - started:.0f} s "
              "wall, references and correctness passes included)")  # fmt: skip


def error_part(methods: list[str]) -> None:
    qkv = load_input("sample:glove")
    shape = qkv.shape
    print(f"\n2. decode-phase error on sample:glove (b = {shape['b']}, n = {shape['n_k']}), the "
          f"last {QUERIES} queries over their prefixes, 3 seeds, rel_spectral (mean over seeds)")  # fmt: skip
    config = RunConfig(seeds=3, timing=False, phase="decode", queries=QUERIES)
    started = time.perf_counter()
    report = compare(qkv, methods, list(BUDGETS), config)
    print(f"   floors: mean of the prefix {report.floors.mean_floor('rel_spectral'):.4g}, "
          f"zero output {report.floors.zero['rel_spectral'].mean:.4g}")  # fmt: skip
    table: dict[str, dict[int | None, list[float]]] = {}
    problems: dict[tuple[str, int | None], str] = {}
    for record in report.results:
        cell = table.setdefault(record.method, {}).setdefault(record.budget, [])
        value = record.error("rel_spectral")
        if record.status == "ok" and value is not None:
            cell.append(value)
        else:
            problems[(record.method, record.budget)] = f"{record.status}: {record.reason}"
    print(f"   {'method':15s}" + "".join(f"{b:>10d}" for b in BUDGETS))
    for method, cells in table.items():
        values = []
        for budget in BUDGETS if get_method_class(method).uses_budget else (None,):
            seeds = cells.get(budget, [])
            values.append(f"{sum(seeds) / len(seeds):.4g}" if seeds else "—")
        print(f"   {method:15s}" + "".join(f"{v:>10s}" for v in values))
    for (method, budget), why in problems.items():
        print(f"   {method} @ {budget}: {why[:150]}")
    print(f"   ({time.perf_counter() - started:.0f} s wall)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,65536,1048576")
    parser.add_argument("--skip-million", action="store_true")
    parser.add_argument("--methods", default=TIMED, help="methods timed in part 1")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-error", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{cpu_name()}")  # fmt: skip
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.skip_million:
        lengths = [n for n in lengths if n < 2**20]
    if not args.skip_time:
        time_part(lengths, args.methods.split(","), args.budget, args.steps)
    if not args.skip_error:
        every = [m for m in method_names() if get_method_class(m).role != "reference"]
        error_part(["exact", *every])


if __name__ == "__main__":
    main()
