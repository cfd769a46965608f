"""Issues 3 and 5: every method side by side.

1. Quality on the KDEformer paper's GloVe protocol (n = 8192, b = 8, float64, budgets 64…1024,
   3 seeds; mean rel_spectral), the reproduction of the paper's GloVe figure, plus Performer with
   i.i.d. features beside the orthogonal default.
2. The same on a synthetic clustered input.
3. Time of each method against scaled_dot_product_attention at n = 16384, budget 256, in float32
   and float64, in the same run.
Prints its figures; asserts nothing.

    pip install -e '.[bench]' && python benchmarks/bench_methods.py [--parts quality,synthetic,time]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from kdecli.tuning import enable_huge_pages

# as the kdecli command does, before torch allocates anything, so the timings match it
enable_huge_pages()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import glove_protocol  # noqa: E402

import kdecli  # noqa: E402
from kdecli.measure.timing import time_call  # noqa: E402
from kdecli.methods import get_method_class, make_method  # noqa: E402
from kdecli.qkv import QKV  # noqa: E402
from kdecli.sources import load_input  # noqa: E402

BUDGETS = [64, 128, 256, 512, 1024]
METHODS = [
    "kdeformer",
    "performer",
    "reformer",
    "scatterbrain",
    "hyperattention",
    "thinformer",
    "nystromformer",
    "uniform",
    "topk",
    "rankk",
]


FIRST_SLICE_ONLY = {"rankk"}  # an O(n³) eigendecomposition: about a minute per slice at n = 8192


def quality_table(qkv: QKV, methods: list[str], budgets: list[int], seeds: int, extra=()) -> None:
    start = time.perf_counter()
    everywhere = [m for m in methods if m not in FIRST_SLICE_ONLY]
    report = kdecli.compare(qkv, ["exact", "mean", *everywhere], budgets, seeds=seeds, timing=False)
    results = list(report.results)
    slow = [m for m in methods if m in FIRST_SLICE_ONLY]
    if slow:
        first = QKV(qkv.q[:1], qkv.k[:1], qkv.v[:1], qkv.source, default_scale=qkv.default_scale)
        for r in kdecli.compare(first, slow, budgets, seeds=seeds, timing=False).results:
            results.append(dataclasses.replace(r, method=f"{r.method} [slice 0]"))
    rows = defaultdict(list)
    for r in results:
        if r.ok:
            rows[(r.method, r.budget)].append(r.error("rel_spectral"))
        else:
            rows[(r.method, r.budget)].append(float("nan"))
            print(f"  {r.method} @ {r.budget}: {r.status}: {r.reason}")
    for label, name, params in extra:
        for budget in budgets:
            rep = kdecli.compare(
                qkv, [name], [budget], seeds=seeds, timing=False, params={name: params}
            )
            rows[(label, budget)] = [r.error("rel_spectral") for r in rep.results]
    floor = report.floors.mean_floor()
    print(
        f"\n== {qkv.source}: mean rel_spectral over {seeds} seeds, scale {report.input.scale:.4g}, "
        f"{report.environment.dtype} ({time.perf_counter() - start:.0f} s) =="
    )
    print(
        f"mean-of-V floor {floor:.4f}; exact {statistics.fmean(rows[('exact', None)]):.2e}; "
        "* marks a value not below the mean floor"
    )
    print(f"{'method':>30} " + " ".join(f"{b:>9}" for b in budgets))
    names = [m if m not in FIRST_SLICE_ONLY else f"{m} [slice 0]" for m in methods]
    for name in [*names, *(label for label, _, _ in extra)]:
        cells = []
        for budget in budgets:
            values = rows.get((name, budget))
            if not values:
                cells.append(f"{'—':>9}")
                continue
            mean = statistics.fmean(values)
            cells.append(f"{mean:8.4f}{'*' if not mean < floor else ' '}")
        base = name.split(" ")[0]
        oracle = " (oracle)" if base in METHODS and get_method_class(base).oracle else ""
        print(f"{name + oracle:>30} " + " ".join(cells))


def timing_table(
    n: int, budget: int, dtypes=(torch.float32, torch.float64), b: int = 2, d: int = 64
) -> None:
    for dtype in dtypes:
        qkv = load_input(f"synthetic:n={n},d={d},b={b},h=1,seed=0").to("cpu", dtype)
        q, k, v = qkv.q, qkv.k, qkv.v
        scale = d**-0.5
        exact = make_method("exact")
        with torch.no_grad():
            t_exact = time_call(
                lambda: exact(q, k, v, scale=scale), "cpu", repeats=3, warmup=1
            ).median
        print(
            f"\n== time at n={n}, b·h={b}, d={d}, budget {budget}, {str(dtype).removeprefix('torch.')}, "
            f"{torch.get_num_threads()} threads: SDPA {t_exact * 1e3:.0f} ms =="
        )
        for name in METHODS:
            method = make_method(name, budget)
            reasons = method.not_supported_reasons(q, k, v)
            if reasons:
                print(f"{name:>15}  cannot run: {'; '.join(reasons)}")
                continue
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                t = time_call(
                    lambda: method(q, k, v, scale=scale, generator=gen), "cpu", repeats=3, warmup=1
                )
            verdict = "faster" if t.median < t_exact else "SLOWER than exact"
            print(
                f"{name:>15}  {t.median * 1e3:9.1f} ms   speed-up {t_exact / t.median:6.1f}×  {verdict}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", default="quality,synthetic,time")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    parts = args.parts.split(",")
    methods = args.methods.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "quality" in parts:
        extra = (
            [("performer (iid)", "performer", {"orthogonal": "false"})]
            if "performer" in methods
            else []
        )
        quality_table(glove_protocol(), methods, BUDGETS, args.seeds, extra)
    if "synthetic" in parts:
        qkv = load_input("synthetic:n=4096,d=64,b=4,h=1,seed=0,kind=clustered").to(
            "cpu", torch.float64
        )
        quality_table(qkv, methods, BUDGETS, args.seeds)
    if "time" in parts:
        timing_table(16384, 256)


if __name__ == "__main__":
    main()
