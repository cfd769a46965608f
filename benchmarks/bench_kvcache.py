"""The KV-cache methods (streaming, h2o, snapkv, quest, magicpig) against their ceilings (topk,
topk_pages) and the mean floor, on real vectors; and the time of a decode step at 64k keys.
Prints its figures; asserts nothing.

    python benchmarks/bench_kvcache.py [--input sample:glove] [--seeds 2] [--queries 64]
                                       [--skip-time] [--skip-prefill]

1. Decode: ``compare`` on ``--input`` (default ``sample:glove``: b = 2, n = 2048, d = 50; or a
   layer of a capture, ``smol.h5:/layer15``: the heads of a real causal LM), the last
   ``--queries`` queries each over its own prefix, at budgets 64–1024: rel_spectral (mean over
   seeds) and the keys each query read (measured: magicpig's candidates are random), with the
   mean-of-the-prefix floor.  h2o and snapkv choose from the prompt's attention: their cache is
   prepared with the queries before the measured ones.
2. Prefill: the same under the causal mask (every row over its prefix), where each rule is
   defined for every row; h2o and snapkv are decode only, and magicpig is left out (its
   collision test here compares every query with every key in each of L tables: minutes at
   n = 2048).
3. Time: ``kdecli.experiments.scale`` with ``phase="decode"`` on ``synthetic:d=64`` (b·h = 1,
   float32, one query over 65,536 cached keys, budget 256) against SDPA over the whole cache.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from kdecli.experiments.compare.run import compare
from kdecli.experiments.scale.report import rows
from kdecli.experiments.scale.run import scale
from kdecli.measure.config import RunConfig
from kdecli.sources import load_input

METHODS = ["streaming", "h2o", "snapkv", "quest", "magicpig", "topk", "topk_pages", "uniform"]
DECODE_ONLY = ("h2o", "snapkv", "magicpig")  # magicpig: defined for prefill, minutes here
BUDGETS = [64, 128, 256, 512, 1024]


def error_table(source: str, phase: str, seeds: int, queries: int) -> None:
    # magicpig's collision test costs n_q·n_k·L here (a table lookup when deployed): decode only
    methods = METHODS if phase == "decode" else [m for m in METHODS if m not in DECODE_ONLY]
    qkv = load_input(source)
    config = RunConfig(seeds=seeds, timing=False, phase=phase, queries=queries, causal=True)
    started = time.perf_counter()
    report = compare(qkv, methods, BUDGETS, config)
    what = f"the last {queries} queries" if phase == "decode" else "every query (causal)"
    print(f"\n{phase} on {source}, {what}: rel_spectral (keys read per query); floor "
          f"{report.floors.mean_floor('rel_spectral'):.4g} (mean of the prefix)")  # fmt: skip
    cells: dict[tuple[str, int], list] = {}
    for r in report.results:
        cells.setdefault((r.method, r.budget), []).append(r)
    print(f"{'method':12s}" + "".join(f"{b:>18d}" for b in BUDGETS))
    for method in methods:
        line = f"{method:12s}"
        for budget in BUDGETS:
            ok = [r for r in cells.get((method, budget), []) if r.status == "ok"]
            if not ok:
                line += f"{'—':>18s}"
                continue
            error = sum(r.error("rel_spectral") for r in ok) / len(ok)
            keys = sum(r.keys_per_query for r in ok) / len(ok)
            line += f"{f'{error:.4f} ({keys:.0f})':>18s}"
        print(line)
    print(f"({time.perf_counter() - started:.0f} s wall)")


def time_table(budget: int) -> None:
    config = RunConfig(seeds=1, repeats=3, warmup=1, min_time=0.2, phase="decode", steps=64)
    report = scale("synthetic:d=64", METHODS, budget, [65536], config)
    print(f"\ndecode step over 65,536 keys, budget {budget}, float32, b·h = 1")
    print(f"{'method':12s} {'step':>10s} {'SDPA':>10s} {'speed-up':>9s} {'error':>9s}  status")
    for row in rows(report):
        print(f"{row.method:12s} {row.time_s or float('nan'):>10.3g} "
              f"{row.exact_s or float('nan'):>10.3g} {row.speedup or float('nan'):>9.3g} "
              f"{row.error or float('nan'):>9.3g}  {row.status}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="sample:glove")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    error_table(args.input, "decode", args.seeds, args.queries)
    if not args.skip_prefill:
        error_table(args.input, "prefill", args.seeds, args.queries)
    if not args.skip_time:
        time_table(256)


if __name__ == "__main__":
    main()
