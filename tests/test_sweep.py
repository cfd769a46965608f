"""Sweeps past one machine: job keys, the grid's digest, deterministic shards, and --resume."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kdecli
from kdecli.cli import app
from kdecli.errors import RuntimeFailure
from kdecli.experiments.compare.plan import plan_grid
from kdecli.experiments.compare.records import load_document
from kdecli.experiments.compare.run import compare_layers
from kdecli.measure.config import RunConfig
from kdecli.sources.synthetic import synthetic
from kdecli.sweeps.grid import keys_of

runner = CliRunner()
SYN = "synthetic:n=192,d=16,b=1,h=2"
METHODS = "exact,kdeformer,performer,uniform"
FAST = ("--repeats", 1, "--warmup", 0, "--min-time", 0)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def sweep_args(*extra, methods=METHODS, budgets="16,32,64"):
    return ("compare", SYN, "--methods", methods, "--budgets", budgets, "--seeds", 2, *FAST, *extra)


def records(path):
    """{key: result dict} of a JSONL file, and its run header."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert lines[0]["type"] == "run"
    return {r["key"]: r for r in lines[1:] if r["type"] == "result"}, lines[0]


def grid_of(**settings):
    qkv = synthetic(SYN)
    config = RunConfig(seeds=2, **settings)
    return plan_grid([qkv], METHODS.split(","), [16, 32, 64], config)


# ---- keys and the grid -------------------------------------------------------------------------


def test_every_record_has_a_distinct_key_and_the_digest_ignores_listing_order():
    grid = grid_of()
    keys = grid.keys
    # exact draws nothing: one record; three randomized methods × 3 budgets × 2 seeds
    assert len(keys) == 1 + 3 * 3 * 2 == len(set(keys))
    qkv = synthetic(SYN)
    shuffled = plan_grid(
        [qkv], ["uniform", "exact", "performer", "kdeformer"], [64, 16, 32], seeds=2
    )
    assert shuffled.digest == grid.digest and set(shuffled.keys) == set(keys)
    assert [j.keys for j in shuffled.shard(1, 3)] != [] and keys_of(
        shuffled.shard(1, 3)
    ) == keys_of(grid.shard(1, 3))


def test_keys_change_with_what_is_measured_and_not_with_how_long_it_is_timed():
    base = set(grid_of().keys)
    for change in (
        {"dtype": "float64"},
        {"scale": 0.5},
        {"causal": True},
        {"reference": "rows:64"},
        {"budget_mode": "keys"},
        {"bound": True},
        {"timing": False},
        {"backward": True},
    ):
        assert base.isdisjoint(grid_of(**change).keys), change
    assert set(grid_of(repeats=9, min_time=0.5, warmup=3).keys) == base
    # seeds 1, 2 share seed 1's records with seeds 0, 1 (and exact's, which draws nothing)
    shifted = grid_of(seed=1)
    shared = {j.key_of(s) for j in shifted.jobs for s in j.seeds if s in (1, None)}
    assert base & set(shifted.keys) == shared and len(shared) == 1 + 3 * 3
    # a parameter changes the records of the methods that have it, only those
    qkv = synthetic(SYN)
    grid = plan_grid(
        [qkv], METHODS.split(","), [16, 32, 64], seeds=2, params={"kdeformer": {"block_size": 8}}
    )
    changed = {job.method for job in grid.jobs if not set(job.keys) <= base}
    assert changed == {"kdeformer"}


def test_keys_of_existing_settings_are_those_of_0_6_so_old_resume_files_resume():
    """The digests of two grids as kdecli 0.6.0 planned them (full and causal): the keys hash the
    same content now that the mask is a type (``causal`` a bool, no ``query_offset`` at 0)."""
    qkv = kdecli.load_input("synthetic:n=200,d=16,b=1,h=2")
    methods, budgets = ["exact", "kdeformer", "performer", "mean", "reformer"], [32, 64]
    for causal, digest, first in (
        (False, "be5a9722a718ab58", ["4c522d87e2c30d16", "5400ad2b4a3fd267"]),
        (True, "3d5d2f426652e41d", ["f2bf1cdb293ee59c", "3f95f54f7b98691e"]),
    ):
        config = RunConfig(seeds=2, timing=False, causal=causal, device="cpu")
        grid = plan_grid([qkv], methods, budgets, config)
        assert (grid.digest, grid.keys[:2]) == (digest, first), causal
        explicit = plan_grid([qkv], methods, budgets, config, query_offset=0 if causal else None)
        assert explicit.keys == grid.keys and "query_offset" not in str(grid.spec)


def test_a_query_offset_is_part_of_the_key_only_when_it_is_not_zero():
    """Causal queries over a longer key set: the default is the last positions (bottom-right);
    each offset is its own measurement, and the grid's spec names it."""
    qkv = kdecli.load_input("synthetic:n=64,nq=16,d=8")

    def plan(**settings):
        return plan_grid([qkv], ["exact"], [], causal=True, **settings)

    default, last, first = plan(), plan(query_offset=48), plan(query_offset=0)
    assert default.keys == last.keys and first.keys != last.keys
    assert default.jobs[0].setting.query_offset == 48
    assert default.spec["inputs"][0]["query_offset"] == 48 and "query_offset" not in str(first.spec)


def test_a_planned_job_carries_its_method_and_travels_without_it():
    """The plan's method object runs the job; a pickled job (a Ray task) is rebuilt once where
    it lands, and refused there if that kdecli resolves its parameters otherwise."""
    grid = plan_grid([synthetic(SYN)], ["kdeformer"], [16], seeds=1)
    (job,) = grid.jobs
    assert job.instance() is job.built and job.setting.budget_mode == "paper"
    moved = pickle.loads(pickle.dumps(job))
    assert moved.built is None and moved == job and moved.keys == job.keys
    rebuilt = moved.instance()
    assert rebuilt is not job.built and moved.instance() is rebuilt
    assert rebuilt.resolved_params == job.resolved
    other = replace(pickle.loads(pickle.dumps(job)), resolved={**job.resolved, "samples": 1})
    with pytest.raises(RuntimeFailure, match="resolves its parameters differently"):
        other.instance()


def test_the_input_is_identified_by_its_content_not_its_name():
    qkv = synthetic(SYN)
    renamed = replace(qkv, source="/elsewhere/on/another/machine.npz")
    assert plan_grid([renamed], ["exact"], []).keys == plan_grid([qkv], ["exact"], []).keys
    touched = replace(qkv, q=qkv.q.clone())
    touched.q[0, 0, 0, 0] += 1e-3
    assert plan_grid([touched], ["exact"], []).keys != plan_grid([qkv], ["exact"], []).keys


def test_shards_partition_the_grid_deterministically_and_balance_its_cost():
    grid = grid_of()
    largest = max(job.cost for job in grid.jobs)
    for count in (1, 2, 3, 4, 7, 40):
        shards = [grid.shard(i, count) for i in range(count)]
        sets = [keys_of(jobs) for jobs in shards]
        assert set().union(*sets) == set(grid.keys)
        assert sum(map(len, sets)) == len(grid.keys)  # disjoint
        assert [keys_of(grid_of().shard(i, count)) for i in range(count)] == sets  # deterministic
        costs = [sum(job.cost for job in jobs) for jobs in shards]
        # dealt round-robin from the costliest down: no shard exceeds another by more than a job
        assert max(costs) - min(costs) <= largest
        for jobs in shards:  # a job's seeds stay together
            assert all(len(job.keys) == len(job.seeds) for job in jobs)


def test_shard_arguments_are_checked():
    res = invoke(*sweep_args("--num-shards", 3, "--shard-id", 3))
    assert res.exit_code == 2 and "--shard-id counts from 0" in res.stderr
    assert "Traceback" not in res.output
    res = invoke(*sweep_args("--shard-id", 0))
    assert res.exit_code == 2 and "go together" in res.stderr
    res = invoke(*sweep_args("--num-shards", 0, "--shard-id", 0))
    assert res.exit_code == 2 and "at least 1" in res.stderr


# ---- shards through the CLI --------------------------------------------------------------------


def test_three_shards_are_the_unsharded_run(tmp_path):
    whole = tmp_path / "all.jsonl"
    assert invoke(*sweep_args("-f", "jsonl", "-o", whole)).exit_code == 0
    everything, header = records(whole)
    assert header["grid"]["num_shards"] is None
    assert {job["key"] for job in header["grid"]["jobs"]} == set(everything)
    union = {}
    for shard in range(3):
        part = tmp_path / f"part{shard}.jsonl"
        res = invoke(*sweep_args("--num-shards", 3, "--shard-id", shard, "-f", "jsonl", "-o", part))
        assert res.exit_code == 0, res.stderr
        found, head = records(part)
        assert (head["grid"]["shard_id"], head["grid"]["num_shards"]) == (shard, 3)
        assert head["grid"]["digest"] == header["grid"]["digest"]
        assert head["grid"]["jobs"] == header["grid"]["jobs"]  # every shard names the whole grid
        assert union.keys().isdisjoint(found)
        union.update(found)
    assert union.keys() == everything.keys()
    for key, record in everything.items():  # generators depend on method and seed only
        assert union[key]["errors"] == record["errors"], record["method"]
        assert union[key]["status"] == record["status"]


def test_a_json_document_carries_its_grid_too(tmp_path):
    res = invoke(*sweep_args("-f", "json", methods="exact,uniform", budgets="16"))
    doc = json.loads(res.stdout)
    assert {r["key"] for r in doc["results"]} == {j["key"] for j in doc["grid"]["jobs"]}
    assert load_document_text(tmp_path, res.stdout).grid.digest == doc["grid"]["digest"]


def load_document_text(tmp_path, text):
    path = tmp_path / "doc.json"
    path.write_text(text)
    return load_document(path)


def test_a_layer_with_nothing_to_run_is_skipped_whole():
    qkv = synthetic(SYN)
    layers = [replace(qkv, layer=0), replace(qkv, q=qkv.q * 2, layer=1)]
    grid = plan_grid(layers, ["exact", "uniform"], [16], timing=False)
    only = {job.keys[0] for job in grid.jobs if job.layer == 1}
    report = compare_layers(layers, ["exact", "uniform"], [16], timing=False, only=only)
    assert [layer.layer for layer in report.layers] == [1]
    assert {r.key for r in report.results} == only and {r.layer for r in report.results} == {1}


# ---- resume ------------------------------------------------------------------------------------


def test_resume_after_a_crash_redoes_nothing_that_finished(tmp_path):
    path = tmp_path / "run.jsonl"
    res = invoke(*sweep_args("--resume", path, "-q"))
    assert res.exit_code == 0, res.stderr
    full, _ = records(path)
    lines = path.read_text().splitlines(keepends=True)
    # a crash: the header, four records, and half of the fifth line
    kept = "".join(lines[:5]) + lines[5][: len(lines[5]) // 2]
    path.write_text(kept)
    res = invoke(*sweep_args("--resume", path))
    assert res.exit_code == 0, res.stderr
    assert "cut short" in res.stderr and "4 of 19 records of the grid already done" in res.stderr
    text = path.read_text()
    assert text.startswith("".join(lines[:5]))  # finished records untouched, not redone
    again, _ = records(path)  # the half line is gone: every line parses
    assert again.keys() == full.keys()
    assert len(text.splitlines()) == 1 + len(full)  # no record twice
    for key, record in full.items():
        assert again[key]["errors"] == record["errors"]
    res = invoke(*sweep_args("--resume", path))
    assert res.exit_code == 0 and "Nothing left to run" in res.stderr
    assert path.read_text() == text
    assert "kdeformer" in res.stdout  # the table of the whole file


def test_resume_retries_what_did_not_finish_ok(tmp_path):
    path = tmp_path / "run.jsonl"
    args = sweep_args("--resume", path, "-q", methods="exact,uniform", budgets="16")
    assert invoke(*args).exit_code == 0
    lines = path.read_text().splitlines()
    failed = json.loads(lines[2])
    failed.update(status="error", reason="a node went away", errors={})
    lines[2] = json.dumps(failed)
    path.write_text("\n".join(lines) + "\n")
    res = invoke(*sweep_args("--resume", path, methods="exact,uniform", budgets="16"))
    assert res.exit_code == 0, res.stderr
    assert "1 to run" in res.stderr
    after = path.read_text().splitlines()
    assert after[:3] == lines[:3] and len(after) == len(lines) + 1
    retry = json.loads(after[-1])
    assert retry["key"] == failed["key"] and retry["status"] == "ok"
    report = load_document(path)  # the retry stands in place of the failure
    assert [r.key for r in report.results].count(failed["key"]) == 1
    assert all(r.ok for r in report.results)


def test_resume_refuses_another_grid_another_shard_and_other_files(tmp_path):
    path = tmp_path / "run.jsonl"
    assert invoke(*sweep_args("--resume", path, "-q", methods="exact,uniform")).exit_code == 0
    before = path.read_text()
    res = invoke(*sweep_args("--resume", path, methods="exact,uniform", budgets="16,32"))
    assert res.exit_code == 2 and "different budgets ([16, 32, 64] vs [16, 32])" in res.stderr
    res = invoke(*sweep_args("--resume", path, "--dtype", "float64", methods="exact,uniform"))
    assert res.exit_code == 2 and "different dtype" in res.stderr
    res = invoke(
        *sweep_args("--resume", path, "--num-shards", 2, "--shard-id", 0, methods="exact,uniform")
    )
    assert res.exit_code == 2 and "holds the whole grid, but this run is shard 0 of 2" in res.stderr
    assert path.read_text() == before  # a refused resume changes nothing
    other = tmp_path / "notes.jsonl"
    other.write_text('{"hello": 1}\n')
    res = invoke(*sweep_args("--resume", other))
    assert res.exit_code == 2 and "is not a JSONL results file" in res.stderr
    res = invoke(*sweep_args("--resume", path, "-o", path, methods="exact,uniform"))
    assert res.exit_code == 2 and "name the same file" in res.stderr
    assert "Traceback" not in res.output
    res = invoke(*sweep_args("--resume", tmp_path / "new.jsonl", "-p", "uniform.nonsense=1"))
    assert res.exit_code == 2 and not (tmp_path / "new.jsonl").exists()  # refused untouched


def start_slow_run(path):
    """A resumable run that takes a few seconds (timed at least 0.15 s per setting), and the
    number of whole lines it has written once it has finished three records."""
    args = [
        sys.executable, "-m", "kdecli", "compare", SYN, "--methods", METHODS, "--budgets", "16,32",
        "--seeds", 2, "--repeats", 1, "--warmup", 0, "--min-time", "0.15", "--resume", path,
    ]  # fmt: skip
    args = [str(a) for a in args]
    env = {**os.environ, "PYTHONPATH": str(Path(kdecli.__file__).parents[1])}
    process = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and path.read_text().count('"type": "result"') >= 3:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be stopped"
    return process, args, env


def finish_and_check(path, args, env, whole: bytes):
    done = [json.loads(line) for line in whole.decode().splitlines()[1:]]
    assert len(done) >= 3
    finish = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr
    assert f"{len(done)} of 13 records of the grid already done" in finish.stderr
    assert path.read_bytes().startswith(whole)
    final, header = records(path)
    assert set(final) == {job["key"] for job in header["grid"]["jobs"]}
    assert len(path.read_text().splitlines()) == 1 + len(final)
    for record in done:  # not redone: the same line, time included
        assert final[record["key"]] == record


def test_a_killed_run_loses_no_finished_record(tmp_path):
    """SIGKILL part way (no handler runs): every record written before stands, and the rerun
    completes the grid and leaves them as they were."""
    path = tmp_path / "run.jsonl"
    process, args, env = start_slow_run(path)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    written = path.read_bytes()
    finish_and_check(path, args, env, written[: written.rfind(b"\n") + 1])


def test_an_interrupted_resume_says_how_to_go_on(tmp_path):
    path = tmp_path / "run.jsonl"
    process, args, env = start_slow_run(path)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 130, stderr
    assert "rerun the same command to go on" in stderr
    written = path.read_bytes()
    assert written.endswith(b"\n")  # a graceful stop finishes its line
    finish_and_check(path, args, env, written)


# ---- the CLI on Ray ----------------------------------------------------------------------------


def test_the_cli_runs_a_resumable_sweep_on_ray(ray_cluster, tmp_path):
    path = tmp_path / "ray.jsonl"
    args = sweep_args("--executor", "ray", "--resume", path, methods="exact,uniform", budgets="16")
    res = invoke(*args)
    assert res.exit_code == 0, res.stderr
    found, header = records(path)
    assert set(found) == {job["key"] for job in header["grid"]["jobs"]}
    assert {r["environment"]["threads"] for r in found.values()} == {1}  # one thread per task
    res = invoke(*args)
    assert res.exit_code == 0 and "Nothing left to run" in res.stderr
    # a GPU is asked of a cluster without one: refused with the reason, no traceback
    res = invoke(
        *sweep_args("--executor", "ray", "--device", "cuda", methods="exact", budgets="16")
    )
    assert res.exit_code == 2 and "the Ray cluster has no GPU" in res.stderr
    res = invoke(*sweep_args("--executor", "spark"))
    assert res.exit_code == 2 and "--executor must be one of local, ray" in res.stderr


def test_reading_and_merging_results_needs_no_torch():
    """`kdecli report` and `kdecli merge` read documents whose records carry keys and grids:
    that reading must not pull in torch (seconds of start-up)."""
    code = "import sys, kdecli.experiments.compare.records, kdecli.sweeps.merge, kdecli.sweeps.grid; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(kdecli.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
