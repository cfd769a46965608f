import pytest
import torch


def make_qkv(b=2, h=3, n_q=47, n_k=47, d=21, d_v=None, dtype=torch.float64, seed=0, spread=1.0):
    """Random inputs; ``spread`` scales q and k, so logits grow like spread²."""
    g = torch.Generator().manual_seed(seed)
    d_v = d if d_v is None else d_v
    q = torch.randn(b, h, n_q, d, generator=g, dtype=torch.float64) * spread
    k = torch.randn(b, h, n_k, d, generator=g, dtype=torch.float64) * spread
    v = torch.randn(b, h, n_k, d_v, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.fixture
def qkv_factory():
    return make_qkv


def gen(seed=0):
    return torch.Generator().manual_seed(seed)
