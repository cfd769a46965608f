"""The device path: every method on a device against the same method in float64, and a whole run.

Parametrised by device: ``cpu`` always (so a mistake in these bodies fails on any machine) and
``cuda`` where a CUDA device exists (marked ``cuda``; skipped without one).
"""

import pytest
import torch

import kdecli
from kdecli.measure.reference import exact_attention
from kdecli.methods import get_method_class, make_method, method_names
from tests.conftest import make_qkv

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.mark.parametrize("name", method_names())
def test_method_runs_on_the_device_with_a_device_generator(name, device):
    q, k, v = (t.to(device) for t in make_qkv(2, 2, 97, 97, 21, 13, dtype=torch.float32))
    budget = 16 if get_method_class(name).uses_budget else None
    method = make_method(name, budget)
    if method.not_supported_reasons(q, k, v):
        pytest.skip("; ".join(method.not_supported_reasons(q, k, v)))
    gen = torch.Generator(device=device).manual_seed(0)
    out = method(q, k, v, scale=0.2, generator=gen)
    assert out.device.type == device.type and out.shape == (2, 2, 97, 13)
    assert torch.isfinite(out).all()
    again = method(q, k, v, scale=0.2, generator=torch.Generator(device=device).manual_seed(0))
    assert torch.equal(out, again)


@pytest.mark.parametrize(
    "name", ["exact", "kdeformer", "reformer", "scatterbrain", "hyperattention"]
)
def test_exact_limits_hold_on_the_device(name, device):
    q, k, v = (t.to(device) for t in make_qkv(1, 2, 97, 97, 21, 13))
    limit = {
        "kdeformer": {"block_size": 97},
        "reformer": {"chunk_size": 97},
        "scatterbrain": {"local_context": 2 * 97},
        "hyperattention": {"block_size": 97},
    }
    budget = 16 if get_method_class(name).uses_budget else None
    out = make_method(name, budget, **limit.get(name, {}))(
        q, k, v, scale=0.2, generator=torch.Generator(device=device).manual_seed(0)
    )
    assert (out - exact_attention(q, k, v, 0.2)).abs().max() < 1e-9


def test_a_whole_run_on_the_device_times_with_synchronisation(device):
    qkv = kdecli.load_input("synthetic:n=513,d=32,b=2,h=2,kind=clustered")
    report = kdecli.compare(
        qkv, ["exact", "mean", "kdeformer", "performer"], [64], seeds=2, device=str(device),
        repeats=2,
    )  # fmt: skip
    assert report.environment.device.startswith(device.type)
    assert all(r.status == "ok" for r in report.results)
    for record in report.results:
        stat = record.time.method_s
        # CUDA reads its allocator's peak; the CPU samples RSS, which a small call may not move
        if device.type == "cuda":
            assert stat.memory_source == "cuda" and stat.peak_memory_bytes > 0
        else:
            assert stat.memory_source in ("rss", None)
            assert stat.peak_memory_bytes is None or stat.peak_memory_bytes >= 0
