"""Any length: kdeformer (and friends) against exact attention from n = 16,384 to 1,048,576.
Prints its figures; asserts nothing.

    python benchmarks/bench_scale.py [--max-n 1048576] [--skip-million] [--skip-reference-memory]

1. `kdecli compare synthetic:n=1048576,d=64 --methods kdeformer --budgets 256 --reference
   rows:4096` (b·h = 1, float32): its wall time, reference included, as a user runs it.
2. `kdecli scale synthetic:d=64 --methods kdeformer,hyperattention,performer --budget 256 --n
   16384,65536,262144,1048576`: time against n, the fitted exponents, the speed-ups over exact
   attention (measured where it fits, extrapolated from a row sample beyond; the table says which).
3. The float64 full reference at n = 131,072, d = 64, one slice: its peak RSS (a child process,
   `ru_maxrss`) and time.
Each step runs the `kdecli` command in a child process, so what is timed is what a user gets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REFERENCE_MEMORY = r"""
import resource, sys, time, torch
from kdecli.measure.reference import exact_attention
n = int(sys.argv[1])
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 1, n, 64, generator=g, dtype=torch.float64) for _ in range(3))
start = time.perf_counter()
exact_attention(q, k, v, 0.125)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def kdecli(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "kdecli", *args], capture_output=True, text=True, check=False
    )
    elapsed = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"kdecli {' '.join(args)} failed ({res.returncode}):\n{res.stderr}")
    return elapsed, res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-n", type=int, default=2**20)
    parser.add_argument("--skip-million", action="store_true")
    parser.add_argument("--skip-reference-memory", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")

    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_million:
            out = Path(tmp) / "million.json"
            spec = f"synthetic:n={args.max_n},d=64"
            elapsed, _ = kdecli(
                "compare", spec, "--methods", "kdeformer", "--budgets", "256",
                "--reference", "rows:4096", "-f", "json", "-o", str(out), "--quiet",
            )  # fmt: skip
            doc = json.loads(out.read_text())
            record = doc["results"][0]
            error = record["errors"]["rel_frobenius"]
            interval = error.get("interval") or {}
            print(f"\n1. compare {spec} kdeformer@256 --reference rows:4096: {elapsed:.1f} s wall "
                  f"(reference included); rel_frobenius {error['mean']:.4f} "
                  f"[{interval.get('low')}, {interval.get('high')}], "
                  f"speed-up {record['time']['speedup']:.0f}× "
                  f"(exact extrapolated: {record['time']['exact_s'].get('extrapolated')})")  # fmt: skip

        lengths = [n for n in (2**14, 2**16, 2**18, 2**20) if n <= args.max_n]
        elapsed, res = kdecli(
            "scale", "synthetic:d=64", "--methods", "kdeformer,hyperattention,performer",
            "--budget", "256", "--n", ",".join(map(str, lengths)), "--seeds", "1",
        )  # fmt: skip
        print(f"\n2. scale over n = {lengths} ({elapsed:.0f} s wall):")
        print(res.stdout)

        if not args.skip_reference_memory:
            n = 2**17
            res = subprocess.run(
                [sys.executable, "-c", REFERENCE_MEMORY, str(n)],
                capture_output=True,
                text=True,
                check=True,
            )
            seconds, max_rss_kib = res.stdout.split()
            print(f"3. float64 full reference, n = {n}, d = 64, one slice: peak RSS "
                  f"{int(max_rss_kib) / 2**20:.2f} GiB, {float(seconds):.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
