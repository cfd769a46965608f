"""The CUDA path: every method on the GPU against the same method on the CPU, and a whole run.

Skipped without a CUDA device (this suite must pass on CPU-only machines); run it where one exists.
"""

import pytest
import torch

import kdecli
from kdecli.measure.reference import exact_attention
from kdecli.methods import get_method_class, make_method, method_names
from tests.conftest import make_qkv

pytestmark = pytest.mark.cuda


def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.mark.parametrize("name", method_names())
def test_method_runs_on_the_gpu_with_a_gpu_generator(name):
    needs_cuda()
    q, k, v = (t.cuda() for t in make_qkv(2, 2, 97, 97, 21, 13, dtype=torch.float32))
    budget = 16 if get_method_class(name).uses_budget else None
    method = make_method(name, budget)
    if method.not_supported_reasons(q, k, v):
        pytest.skip("; ".join(method.not_supported_reasons(q, k, v)))
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = method(q, k, v, scale=0.2, generator=gen)
    assert out.device.type == "cuda" and out.shape == (2, 2, 97, 13) and torch.isfinite(out).all()
    again = method(q, k, v, scale=0.2, generator=torch.Generator(device="cuda").manual_seed(0))
    assert torch.equal(out, again)


@pytest.mark.parametrize(
    "name", ["exact", "kdeformer", "reformer", "scatterbrain", "hyperattention"]
)
def test_exact_limits_hold_on_the_gpu(name):
    needs_cuda()
    q, k, v = (t.cuda() for t in make_qkv(1, 2, 97, 97, 21, 13))
    limit = {
        "kdeformer": {"block_size": 97},
        "reformer": {"chunk_size": 97},
        "scatterbrain": {"local_context": 2 * 97},
        "hyperattention": {"block_size": 97},
    }
    budget = 16 if get_method_class(name).uses_budget else None
    out = make_method(name, budget, **limit.get(name, {}))(
        q, k, v, scale=0.2, generator=torch.Generator(device="cuda").manual_seed(0)
    )
    assert (out - exact_attention(q, k, v, 0.2)).abs().max() < 1e-9


def test_a_whole_run_on_the_gpu_times_with_synchronisation():
    needs_cuda()
    qkv = kdecli.load_input("synthetic:n=513,d=32,b=2,h=2,kind=clustered")
    report = kdecli.compare(
        qkv, ["exact", "mean", "kdeformer", "performer"], [64], seeds=2, device="cuda", repeats=2
    )
    assert report.environment["device"].startswith("cuda")
    assert all(r.status == "ok" for r in report.results)
    assert all(r.time.method_s.peak_memory_bytes > 0 for r in report.results)
