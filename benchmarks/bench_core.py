"""Issue 2's figures: KDEformer quality on the paper's GloVe protocol, speed against SDPA, and the
memory of the float64 exact reference.  Prints its figures; asserts nothing.

    pip install -e '.[bench]' && python benchmarks/bench_core.py [--skip-memory]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kdecli.tuning import enable_huge_pages

# as the kdecli command does, before torch allocates anything, so the timings match it
enable_huge_pages()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import glove_protocol  # noqa: E402

import kdecli  # noqa: E402
from kdecli.measure.timing import time_call  # noqa: E402
from kdecli.methods import make_method  # noqa: E402
from kdecli.qkv import QKV  # noqa: E402

BUDGETS = [64, 128, 256, 512, 1024]
REFERENCE_CODE = {64: 0.225, 128: 0.171, 256: 0.115, 512: 0.084, 1024: 0.057}
TARGET = {64: 0.232, 128: 0.176, 256: 0.118, 512: 0.087, 1024: 0.059}


def quality() -> None:
    qkv = glove_protocol()
    report = kdecli.compare(qkv, ["mean", "kdeformer"], BUDGETS, seeds=3, timing=False)
    print(f"\n== quality: {qkv.source}, scale 10^-1/2, float64, 3 seeds (mean rel_spectral) ==")
    print(f"mean-of-V floor: {report.floors.mean_floor():.4f}")
    print(f"{'budget':>6} {'kdecli':>8} {'std':>7} {'reference code':>15} {'target':>7}  verdict")
    for budget in BUDGETS:
        errs = [
            r.error("rel_spectral")
            for r in report.results
            if r.method == "kdeformer" and r.budget == budget
        ]
        mean = statistics.fmean(errs)
        verdict = "ok" if mean <= TARGET[budget] else "MISSED"
        below = 100 * (1 - mean / REFERENCE_CODE[budget])
        print(
            f"{budget:>6} {mean:8.4f} {statistics.stdev(errs):7.4f} {REFERENCE_CODE[budget]:15.3f} "
            f"{TARGET[budget]:7.3f}  {verdict}, {below:.1f}% below the reference code"
        )


def matmul_gflops(dtype: torch.dtype, b: int, m: int, kdim: int, n: int) -> float:
    """Throughput of a batched matmul shaped like kdeformer's own products, in the same run."""
    x = torch.randn(b, m, kdim, dtype=dtype)
    y = torch.randn(b, kdim, n, dtype=dtype)
    t = time_call(lambda: x @ y, "cpu", repeats=7, warmup=2)
    return 2 * b * m * kdim * n / t.median / 1e9


def speed(label: str, qkv: QKV, budget: int = 256) -> None:
    q, k, v = qkv.q, qkv.k, qkv.v
    b, h, n, d = q.shape
    scale = qkv.scale()
    exact = make_method("exact")
    method = make_method("kdeformer", budget)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        t_exact = time_call(lambda: exact(q, k, v, scale=scale), "cpu", repeats=5, warmup=1)
        t_kde = time_call(
            lambda: method(q, k, v, scale=scale, generator=gen), "cpu", repeats=9, warmup=2
        )
    flops = method.flops(b, h, n, n, d, v.shape[-1])
    rate = matmul_gflops(q.dtype, b * h * (n // 128), 128, d, budget + budget // 2)
    floor = flops / (rate * 1e9)
    print(
        f"\n== speed: {label}, budget {budget}, {str(q.dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} threads =="
    )
    print(
        f"SDPA (exact)        median {t_exact.median * 1e3:9.1f} ms  (IQR {t_exact.iqr * 1e3:.1f} ms)"
    )
    print(
        f"kdeformer           median {t_kde.median * 1e3:9.1f} ms  (IQR {t_kde.iqr * 1e3:.1f} ms)"
    )
    print(f"speed-up            {t_exact.median / t_kde.median:9.1f}×   (target ≥ 10×)")
    print(
        f"kdeformer FLOPs     {flops / 1e9:9.2f} GFLOP; matmul speed here {rate:.1f} GFLOP/s "
        f"-> floor {floor * 1e3:.1f} ms; kdeformer runs at {floor / t_kde.median * 100:.0f}% of it"
    )


MEMORY_CHILD = """
import resource, time, torch
from kdecli.measure.reference import exact_attention
g = torch.Generator().manual_seed(0)
q = torch.randn(1, 1, 65536, 64, generator=g, dtype=torch.float64)
k = torch.randn(1, 1, 65536, 64, generator=g, dtype=torch.float64)
v = torch.randn(1, 1, 65536, 64, generator=g, dtype=torch.float64)
start = time.perf_counter()
out = exact_attention(q, k, v, 0.125)
took = time.perf_counter() - start
# VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited over fork)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(int(hwm.split()[1]) / 2**20, took, bool(torch.isfinite(out).all()))
"""


def memory() -> None:
    res = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD], capture_output=True, text=True, check=True
    )
    peak_gb, took, finite = res.stdout.split()
    print("\n== memory: float64 exact reference, n = 65536, d = 64, one slice ==")
    print(
        f"peak RSS {float(peak_gb):.2f} GB (target < 3 GB; an n×n float64 matrix alone would be "
        f"{65536**2 * 8 / 2**30:.0f} GB), {float(took):.1f} s, finite: {finite}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_quality:
        quality()
    if not args.skip_speed:
        speed("GloVe protocol b=8 h=1 n=8192 d=50", glove_protocol())
        g = torch.Generator().manual_seed(0)
        syn = [torch.randn(8, 1, 16384, 64, generator=g) for _ in range(3)]
        speed("synthetic b·h=8 n=16384 d=64", QKV(*syn, "synthetic"))
    if not args.skip_memory:
        memory()
    print(
        f"\n(wall {time.process_time():.0f} s CPU; max RSS of this process "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB)"
    )


if __name__ == "__main__":
    main()
