import pytest
import torch

from kdecli.metrics import slice_errors


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


def clustered_self_attention(seed=0, n=1024):
    """Clustered self-attention inputs (K = Q) where LSH blocks matter, like word vectors."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(1, 2, 24, 16, generator=g, dtype=torch.float64) * 1.5
    which = torch.randint(0, 24, (1, 2, n), generator=g)
    q = torch.gather(centres, 2, which.unsqueeze(-1).expand(1, 2, n, 16))
    q = q + 0.5 * torch.randn(1, 2, n, 16, generator=g, dtype=torch.float64)
    return q, q, torch.randn(1, 2, n, 16, generator=g, dtype=torch.float64)


def mean_error(method, q, k, v, scale, ref, seeds, metric="rel_spectral"):
    """``metric`` of ``method`` against ``ref``, averaged over slices and over one call per seed."""
    errors = [slice_errors(method(q, k, v, scale=scale, generator=gen(s)), ref)[metric].mean()
              for s in seeds]
    return float(torch.stack(errors).mean())
