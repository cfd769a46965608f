"""The timing machinery's figures, where a time may be compared with a time: exact attention's
time extrapolated from a row sample against the time measured in full (full and causal masks),
and a forward + backward against the forward alone, for SDPA and a few methods.  The test suite
checks the same machinery with a fake clock (tests/test_timing.py, tests/test_backward_timing.py);
this prints what the real clock says on this machine.  Asserts nothing.

    python benchmarks/bench_timing.py [--n 4096] [--d 64] [--rows 512] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch

import kdecli
from kdecli.masks import FULL, Causal
from kdecli.measure.environment import cpu_name
from kdecli.measure.timed import TimingOptions, time_exact


def extrapolation(n: int, d: int, rows: int, options: TimingOptions) -> None:
    work = kdecli.load_input(f"synthetic:n={n},d={d}").to("cpu", torch.float32)
    print(f"\n== exact attention, n = {n}, d = {d}: extrapolated from {rows} rows vs measured ==")
    print(f"{'mask':>10} {'measured s':>11} {'extrapolated s':>15} {'ratio':>7}")
    for mask in (FULL, Causal(0)):
        full = time_exact(work, d**-0.5, mask, options)
        part = time_exact(work, d**-0.5, mask, options, limit_flops=0, rows=rows)
        print(
            f"{str(mask):>10} {full.median:11.4f} {part.median:15.4f} "
            f"{part.median / full.median:7.2f}"
        )
    print("(1.00: the extrapolation is exact; the test suite asserts it with a linear fake clock)")


def backward(n: int, d: int, options: TimingOptions) -> None:
    qkv = kdecli.load_input(f"synthetic:n={n},d={d}")
    methods = ["exact", "performer", "uniform"]
    report = kdecli.compare(
        qkv, methods, [64], seeds=1, backward=True, repeats=options.repeats, min_time=0.1
    )
    print(f"\n== forward + backward against the forward, n = {n}, d = {d} ==")
    print(f"{'method':>10} {'forward s':>10} {'fwd+bwd s':>10} {'ratio':>6} {'exact ratio':>12}")
    for record in report.results:
        t = record.time
        print(
            f"{record.method:>10} {t.method_s.median:10.5f} {t.backward_s.median:10.5f} "
            f"{t.backward_s.median / t.method_s.median:6.2f} "
            f"{t.exact_backward_s.median / t.exact_s.median:12.2f}"
        )
    print("(a backward is not free: each ratio is expected above 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    options = TimingOptions(repeats=args.repeats, warmup=1, min_time=0.2)
    extrapolation(args.n, args.d, args.rows, options)
    backward(min(args.n, 1024), min(args.d, 32), options)


if __name__ == "__main__":
    main()
