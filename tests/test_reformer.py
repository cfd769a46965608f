"""The maths of reformer: each key counted once over rounds, the shared-QK variant, buckets.

The exact limit (one chunk, every key met twice per round), the error falling with the budget and
finite outputs at large logits are in the contract battery."""

import pytest
import torch

from kdecli.errors import ParameterError
from kdecli.methods import make_method
from kdecli.methods.reformer import draw_rotations, hash_buckets
from tests.conftest import gen, make_qkv


def union_reference(
    q, k, v, scale, chunk, rounds, n_buckets, seed, shared_qk=False, multiset=False
):
    """Softmax over U_i, the keys query i meets in any round, written the slow, obvious way:
    per round sort by (bucket, position) in Python, cut into chunks, and mark chunk t and t − 1.
    ``multiset=True`` counts a key once per meeting instead: what skipping the correction gives."""
    b, h, n_q, d = q.shape
    if shared_qk:
        k = q / q.norm(dim=-1, keepdim=True)
    n_k = k.shape[-2]
    rot = draw_rotations(b, h, rounds, d, n_buckets, gen(seed), q.device, q.dtype)
    qb, kb = hash_buckets(q, rot).tolist(), hash_buckets(k, rot).tolist()
    c_k = min(chunk, n_k)
    n_c = -(-n_k // c_k)
    c_q = -(-n_q // n_c)
    out = torch.empty(b, h, n_q, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            meets = torch.zeros(n_q, n_k, dtype=torch.float64)
            for r in range(rounds):
                q_sorted = sorted(range(n_q), key=lambda i: (qb[bi][hi][r][i], i))
                k_sorted = sorted(range(n_k), key=lambda j: (kb[bi][hi][r][j], j))
                k_chunk = torch.tensor([0] * n_k)
                k_chunk[torch.tensor(k_sorted)] = torch.arange(n_k) // c_k
                for p, i in enumerate(q_sorted):
                    t = p // c_q
                    meets[i] += (k_chunk == t).double() + (k_chunk == (t - 1) % n_c).double()
            weight = meets if multiset else (meets > 0).double()
            if shared_qk:
                weight.fill_diagonal_(0.0)
            a = weight * torch.exp(scale * q[bi, hi] @ k[bi, hi].T)
            out[bi, hi] = (a @ v[bi, hi]) / a.sum(-1, keepdim=True)
    return out


@pytest.mark.parametrize(
    "n_q,n_k,chunk,rounds,n_buckets",
    [
        (47, 47, 8, 3, 4),
        (59, 97, 10, 2, 6),
        (97, 47, 5, 4, 8),
        (40, 40, 20, 2, 2),
        (97, 97, 16, 8, 0),
    ],
)
def test_matches_the_union_of_rounds_counted_once(n_q, n_k, chunk, rounds, n_buckets):
    q, k, v = make_qkv(1, 2, n_q, n_k, 21, 13)
    method = make_method("reformer", None, chunk_size=chunk, n_hashes=rounds, n_buckets=n_buckets)
    out = method(q, k, v, scale=0.3, generator=gen(5))
    nb = method.n_buckets_for(n_k)
    ref = union_reference(q, k, v, 0.3, chunk, rounds, nb, seed=5)
    assert (out - ref).abs().max() <= 1e-10
    if rounds > 1 and n_k > 2 * chunk:  # power: counting every meeting gives another answer
        naive = union_reference(q, k, v, 0.3, chunk, rounds, nb, seed=5, multiset=True)
        assert (naive - ref).abs().max() > 1e-3


def test_shared_qk_is_the_original_models_function():
    q, k, v = make_qkv(1, 2, 47, 47, 21, 13)
    method = make_method("reformer", None, chunk_size=8, n_hashes=3, n_buckets=4, shared_qk=True)
    out = method(q, k, v, scale=0.3, generator=gen(2))
    ref = union_reference(q, k, v, 0.3, 8, 3, 4, seed=2, shared_qk=True)
    assert (out - ref).abs().max() <= 1e-10
    assert method.estimates != "softmax" and make_method("reformer", 16).estimates == "softmax"
    q2, k2, v2 = make_qkv(1, 1, 30, 47, 21)
    assert method.not_supported_reasons(q2, k2, v2)
    assert not make_method("reformer", 16).not_supported_reasons(q2, k2, v2)


def test_automatic_buckets_and_odd_buckets_rejected():
    method = make_method("reformer", 128)  # chunk_size 64
    assert method.config["chunk_size"] == 64 and method.config["n_hashes"] == 8
    assert method.n_buckets_for(1024) == 16 and method.n_buckets_for(40) == 2
    with pytest.raises(ParameterError, match="`n_buckets`"):
        make_method("reformer", 16, n_buckets=5)
