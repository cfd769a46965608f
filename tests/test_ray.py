"""``--executor ray``: each job a Ray task, giving the records the in-process executor gives.

The in-process runs here use one thread, as each 1-CPU Ray task does, and the comparison is bit for
bit: at another thread count the last bits of some float sums change (LAPACK's SVD under
``rel_spectral``, float32 products of random features), wherever the run happens.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from kdecli.errors import UsageError
from kdecli.experiments.compare.plan import plan_grid
from kdecli.experiments.compare.run import compare_layers
from kdecli.measure.config import RunConfig
from kdecli.methods import registry
from kdecli.methods.uniform import Uniform
from kdecli.qkv import QKV
from kdecli.sweeps.grid import keys_of
from kdecli.sweeps.ray_executor import INSTALL_HINT, run_on_ray
from tests.conftest import make_qkv

CONFIG = RunConfig(seeds=2, repeats=1, warmup=0, min_time=0)
METHODS = ["exact", "kdeformer", "performer", "uniform"]
BUDGETS = [16, 64]


class Ghost(Uniform):
    """Registered in the test process only: the driver's plan accepts it, a worker does not know
    it and raises (a genuine failure inside the task)."""

    name = "ghost"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ghost(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "ghost", Ghost)


def synthetic(n=256, layer=None, seed=0, h=2):
    q, k, v = make_qkv(b=1, h=h, n_q=n, n_k=n, d=16, dtype=torch.float32, seed=seed)
    return QKV(q, k, v, f"synthetic seed={seed}", layer=layer)


def two_layers(n=256):
    return [synthetic(n, layer=0, seed=1), synthetic(n, layer=1, seed=2)]


class Calls:
    """What the callbacks saw, in order."""

    def __init__(self):
        self.events: list[tuple[str, object]] = []

    def kwargs(self):
        return {
            "on_start": lambda report: self.events.append(("start", report)),
            "on_layer": lambda info: self.events.append(("layer", info)),
            "on_result": lambda record: self.events.append(("result", record)),
        }

    def of(self, kind):
        return [item for what, item in self.events if what == kind]


def same_records(ray_report, local_report):
    """Same keys in the same (grid) order, statuses, settings and bit-identical errors."""
    mine, theirs = ray_report.results, local_report.results
    assert [r.key for r in mine] == [r.key for r in theirs]
    for a, b in zip(mine, theirs):
        assert (a.layer, a.method, a.budget, a.seed, a.params, a.status) == (
            b.layer, b.method, b.budget, b.seed, b.params, b.status,
        )  # fmt: skip
        assert a.errors == b.errors, a.key  # float equality of every slice: bit for bit
        assert a.flops == b.flops and a.beats_mean_floor == b.beats_mean_floor


def test_same_records_as_in_process(ray_cluster, one_thread):
    qkv = synthetic()
    calls = Calls()
    report = run_on_ray([qkv], METHODS, BUDGETS, CONFIG, **calls.kwargs())
    local = compare_layers([qkv], METHODS, BUDGETS, CONFIG)
    assert len(local.results) == 1 + 3 * 2 * 2 and all(r.status == "ok" for r in local.results)
    same_records(report, local)
    assert report.floors == local.floors and report.input == local.input
    assert report.layers == [] and not report.interrupted
    assert {r.environment.threads for r in report.results} == {1}  # one thread per 1-CPU task
    # on_start once, before any record; every record through on_result exactly once
    assert [what for what, _ in calls.events][0] == "start" and len(calls.of("start")) == 1
    assert calls.of("layer") == []
    assert Counter(r.key for r in calls.of("result")) == Counter(r.key for r in local.results)
    assert calls.of("start")[0] is report


def test_layers_as_in_process(ray_cluster, one_thread):
    inputs = two_layers()
    calls = Calls()
    report = run_on_ray(inputs, METHODS, BUDGETS, CONFIG, **calls.kwargs())
    local = compare_layers(inputs, METHODS, BUDGETS, CONFIG)
    same_records(report, local)
    assert {r.layer for r in report.results} == {0, 1}
    assert report.layers == local.layers and [x.layer for x in report.layers] == [0, 1]
    assert report.floors == local.floors  # the first layer's, as compare_layers has it
    assert report.layers[0].floors != report.layers[1].floors
    # each layer announced once, before any of its records
    seen: set[int] = set()
    for what, item in calls.events:
        if what == "layer":
            assert item.layer not in seen
            seen.add(item.layer)
        elif what == "result":
            assert item.layer in seen
    assert seen == {0, 1}


def test_records_stream_in_completion_order(ray_cluster):
    """One slow job submitted first (rankk: an eigendecomposition per slice), many quick ones:
    the quick ones' records arrive first, each record once, each task's records together."""
    qkv = synthetic(n=512, h=4)
    methods = ["rankk", *METHODS]
    grid = plan_grid([qkv], methods, BUDGETS, CONFIG)
    slow = grid.jobs[0]
    assert slow.method == "rankk"
    only = keys_of(job for job in grid.jobs if job.method != "rankk") | set(slow.keys)
    calls, progress = Calls(), []
    report = run_on_ray(
        [qkv], methods, BUDGETS, CONFIG, only=only,
        on_progress=lambda *args: progress.append(args), **calls.kwargs(),
    )  # fmt: skip
    arrived = calls.of("result")
    assert Counter(r.key for r in arrived) == Counter(only) and len(report.results) == len(only)
    assert arrived[0].method != "rankk"  # submitted first, finished later
    assert [r.key for r in report.results] == [k for k in grid.keys if k in only]  # grid order
    runs = [(r.method, r.budget) for r in arrived]  # a task's seeds arrive together
    assert len([i for i in range(len(runs)) if i == 0 or runs[i] != runs[i - 1]]) == len(
        {(j.method, j.budget) for j in grid.jobs if set(j.keys) & only}
    )
    assert progress[-1] == (len(only), len(only), "done")


def test_a_failed_task_is_a_record_and_the_others_stand(ray_cluster, ghost, one_thread):
    inputs = two_layers()
    calls = Calls()
    report = run_on_ray(inputs, ["ghost", "kdeformer"], BUDGETS, CONFIG, **calls.kwargs())
    local = compare_layers(inputs, ["ghost", "kdeformer"], BUDGETS, CONFIG)
    assert [r.key for r in report.results] == [r.key for r in local.results]
    failed = [r for r in report.results if r.method == "ghost"]
    assert len(failed) == 2 * 2 * 2
    for record, theirs in zip(failed, [r for r in local.results if r.method == "ghost"]):
        assert record.status == "error" and record.errors == {} and record.time is None
        assert record.reason == "ray task failed: UsageError: unknown method `ghost`."
        assert (record.layer, record.budget, record.seed, record.params) == (
            theirs.layer, theirs.budget, theirs.seed, theirs.params,
        )  # fmt: skip
        assert (record.role, record.estimates) == ("approximation", "softmax")
        assert record.environment.threads == torch.get_num_threads()  # the driver's
    ok = [r for r in report.results if r.method == "kdeformer"]
    assert len(ok) == 8 and all(r.status == "ok" for r in ok)
    assert [r.errors for r in ok] == [r.errors for r in local.results if r.method == "kdeformer"]
    assert report.layers == local.layers and len(calls.of("start")) == 1


def test_every_task_failing_still_gives_each_layer_its_header(ray_cluster, ghost, one_thread):
    """The first finished task failed: the driver computes that layer's floors itself."""
    inputs = two_layers()
    calls = Calls()
    report = run_on_ray(inputs, ["ghost"], BUDGETS, CONFIG, **calls.kwargs())
    local = compare_layers(inputs, ["ghost"], BUDGETS, CONFIG)
    assert [r.status for r in report.results] == ["error"] * len(local.results)
    assert report.layers == local.layers and report.floors == local.floors
    assert [x.layer for x in calls.of("layer")] in ([0, 1], [1, 0])
    assert [what for what, _ in calls.events][:2] == ["start", "layer"]


def test_should_stop_cancels_the_rest_and_keeps_what_finished(ray_cluster):
    qkv = synthetic(n=512)
    methods = [*METHODS, "reformer", "scatterbrain", "thinformer"]
    budgets = [16, 32, 64, 128]
    calls = Calls()
    report = run_on_ray(
        [qkv], methods, budgets, CONFIG, should_stop=lambda: bool(calls.of("result")),
        **calls.kwargs(),
    )  # fmt: skip
    total = len(plan_grid([qkv], methods, budgets, CONFIG).keys)
    assert report.interrupted
    assert 0 < len(report.results) < total
    assert sorted(r.key for r in report.results) == sorted(r.key for r in calls.of("result"))
    assert all(r.status == "ok" for r in report.results)

    calls = Calls()  # stopped before any task was sent: nothing runs, no header is announced
    report = run_on_ray([qkv], methods, budgets, CONFIG, should_stop=lambda: True, **calls.kwargs())
    assert report.interrupted and report.results == [] and calls.events == []
    assert report.input.shape.n_q == 512


def test_nothing_wanted_runs_no_task():
    """Every key done already (a finished --resume): one header, no record, Ray never asked."""
    pytest.importorskip("ray")
    calls = Calls()
    report = run_on_ray(two_layers(), ["kdeformer"], [16], CONFIG, only=(), **calls.kwargs())
    assert report.results == [] and [x.layer for x in report.layers] == [0]
    assert [what for what, _ in calls.events] == ["start", "layer"]


def test_a_local_ray_started_for_the_run_ends_with_it():
    """Without RAY_ADDRESS and with Ray not initialized (the CLI's case), the run starts a local
    Ray and shuts it down before it returns (a process of its own: the tests' Ray is up)."""
    pytest.importorskip("ray")
    script = (
        "import ray, torch\n"
        "from kdecli.qkv import QKV\n"
        "from kdecli.sweeps.ray_executor import run_on_ray\n"
        "g = torch.Generator().manual_seed(0)\n"
        "qkv = QKV(*(torch.randn(1, 2, 64, 8, generator=g) for _ in 'qkv'), 'synthetic')\n"
        "report = run_on_ray([qkv], ['kdeformer'], [16], repeats=1, warmup=0)\n"
        "assert [r.status for r in report.results] == ['ok'], report.results\n"
        "assert not ray.is_initialized()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_keys_planned_for_another_device_are_refused(ray_cluster):
    """The tasks run on the CPUs of this cluster (no GPU): keys of a CUDA plan match nothing."""
    qkv = synthetic()
    cuda_keys = plan_grid([qkv], ["kdeformer"], [16], CONFIG, device=torch.device("cuda")).keys
    with pytest.raises(UsageError, match="planned for --device cuda"):
        run_on_ray([qkv], ["kdeformer"], [16], CONFIG, only=cuda_keys)


def test_missing_ray_is_a_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UsageError) as error:
        run_on_ray([synthetic()], ["kdeformer"], [16], CONFIG)
    assert error.value.hint == INSTALL_HINT and "Ray" in error.value.message
