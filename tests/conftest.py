import pytest
import torch

from kdecli.masks import FULL
from kdecli.measure.metrics import slice_errors


def make_qkv(b=2, h=3, n_q=47, n_k=47, d=21, d_v=None, dtype=torch.float64, seed=0, spread=1.0):
    """Random inputs; ``spread`` scales q and k, so logits grow like spread²."""
    g = torch.Generator().manual_seed(seed)
    d_v = d if d_v is None else d_v
    q = torch.randn(b, h, n_q, d, generator=g, dtype=torch.float64) * spread
    k = torch.randn(b, h, n_k, d, generator=g, dtype=torch.float64) * spread
    v = torch.randn(b, h, n_k, d_v, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


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


def anti_aligned_inputs(norm=60.0):
    """Keys clustered around a direction u, queries around −u: logits from about −1050 to −530."""
    g = gen(11)
    u = torch.randn(21, generator=g, dtype=torch.float64)
    u /= u.norm()
    k = u * norm + 4 * torch.randn(1, 2, 97, 21, generator=g, dtype=torch.float64)
    q = -(u * norm + 4 * torch.randn(1, 2, 97, 21, generator=g, dtype=torch.float64))
    return q, k, torch.randn(1, 2, 97, 13, generator=g, dtype=torch.float64)


def mean_error(method, q, k, v, scale, ref, seeds, metric="rel_spectral", mask=FULL):
    """``metric`` of ``method`` against ``ref``, averaged over slices and over one call per seed."""
    errors = [
        slice_errors(method(q, k, v, scale=scale, generator=gen(s), mask=mask), ref)[metric].mean()
        for s in seeds
    ]
    return float(torch.stack(errors).mean())


def rounding_bound(q, k, v, scale):
    """An honest float64 tolerance for softmax(s·QKᵀ)V: twice (the method and the reference) the
    first-order worst-case forward error of computing it (Higham's γ_n ≈ n·eps).  A logit is a
    d-term dot product, off by at most d·eps·L with L = s·max‖q‖·max‖k‖, which moves an output
    by at most 2·max|v| times that; numerator and denominator each sum n_k terms, off by n_k·eps
    relative, which moves it by at most 2·n_k·eps·max|v|.  That is 1e-12 to 5e-12 for the
    contract's exact-limit shapes; the largest error measured there is 1e-14 (48 eps), and a
    relative bias of 1e-9 in one method's row sums fails it.  A limit that goes through a
    pseudo-inverse (Nyström) or an eigendecomposition (rank-m) can amplify rounding by up to
    κ₂(D⁻¹A); those inputs keep κ₂ below 6·10³ (non-causal), and Nyström's limit gives the 48
    eps."""
    eps = torch.finfo(torch.float64).eps
    logit_scale = abs(scale) * q.norm(dim=-1).max() * k.norm(dim=-1).max()
    return float(4 * eps * v.abs().max() * (k.shape[-2] + q.shape[-1] * logit_scale))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole test run (2 CPUs, no dashboard), shut down at the end; the
    tests that use it are skipped where Ray is not installed."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
