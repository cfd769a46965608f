"""`kdecli merge`: shards of one grid united into the unsharded run, the same in any order, refusing
mismatched grids, with duplicates dropped, conflicts kept, failures superseded and gaps listed."""

import itertools
import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from kdecli.cli import app
from kdecli.experiments.compare.plan import plan_grid
from kdecli.experiments.compare.records import (
    jsonl_header,
    jsonl_layer,
    jsonl_result,
    load_document,
    to_json,
)
from kdecli.experiments.compare.run import compare, compare_layers
from kdecli.records import SchemaError
from kdecli.sources.synthetic import synthetic
from kdecli.sweeps.grid import keys_of
from kdecli.sweeps.merge import differences, measurement, merge_reports

runner = CliRunner()
SPEC = "synthetic:n=256,d=16,b=1,h=2"
METHODS = ["exact", "kdeformer", "performer"]
BUDGETS = [32, 64]
FAST = {"seeds": 2, "min_time": 0, "repeats": 1, "warmup": 0}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_json(report, path):
    path.write_text(to_json(report) + "\n")
    return path


def write_jsonl(report, path):
    lines = [jsonl_header(report)]
    lines += [jsonl_layer(layer) for layer in report.layers]
    lines += [jsonl_result(record) for record in report.results]
    path.write_text("\n".join(lines) + "\n")
    return path


def edited(path, target, change):
    """A copy of the JSON document at ``path`` with ``change(doc)`` applied, at ``target``."""
    doc = json.loads(path.read_text())
    change(doc)
    target.write_text(json.dumps(doc, indent=2) + "\n")
    return target


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One grid (9 records) run whole, and as 3 shards: shard 0 as JSON, 1 and 2 as JSONL."""
    folder = tmp_path_factory.mktemp("merge")
    qkv = synthetic(SPEC)
    grid = plan_grid([qkv], METHODS, BUDGETS, seeds=2)
    full = compare(qkv, METHODS, BUDGETS, **FAST)
    full.grid = grid.info()
    shards, reports = [], []
    for i in range(3):
        part = compare(qkv, METHODS, BUDGETS, only=keys_of(grid.shard(i, 3)), **FAST)
        part.grid = grid.info(i, 3)
        assert part.results, "each shard must hold records for these tests to mean anything"
        reports.append(part)
        write = write_json if i == 0 else write_jsonl
        shards.append(write(part, folder / f"shard{i}.{'json' if i == 0 else 'jsonl'}"))
    return {
        "folder": folder,
        "grid": grid,
        "full": write_json(full, folder / "full.json"),
        "shards": shards,
        "reports": reports,  # the shards as compare returned them, before any file
    }


def merged_of(*paths):
    return merge_reports([load_document(p) for p in paths], [str(p) for p in paths])


def test_three_shards_merge_to_the_unsharded_run(sweep):
    merged = merged_of(*sweep["shards"])
    full = load_document(sweep["full"])
    report = merged.report
    assert [r.key for r in report.results] == [job.key for job in sweep["grid"].info().jobs]
    assert {r.key for r in report.results} == {r.key for r in full.results}
    errors = {r.key: r.errors for r in full.results}
    for record in report.results:
        assert record.errors == errors[record.key], record.method  # bit for bit
    assert merged.missing == () and merged.conflicts == () and merged.duplicates_dropped == 0
    assert report.grid == full.grid.unsharded() and report.grid.shard_id is None
    assert report.merge.missing == () and report.merge.conflicts == ()
    assert not report.interrupted and report.pareto is None


def test_library_merge_is_order_independent_and_idempotent(sweep):
    paths = [*sweep["shards"], sweep["full"]]
    texts = {to_json(merged_of(*order).report) for order in itertools.permutations(paths)}
    assert len(texts) == 1
    merged = sweep["folder"] / "lib-all.json"
    merged.write_text(texts.pop() + "\n")
    for part in paths:
        assert to_json(merged_of(merged, part).report) + "\n" == merged.read_text()
    assert to_json(merged_of(merged).report) + "\n" == merged.read_text()
    assert to_json(merged_of(merged, merged).report) + "\n" == merged.read_text()


def test_each_record_keeps_its_machine_and_the_header_is_chosen_by_content(sweep, tmp_path):
    a, b, c = sweep["shards"]
    moved = load_document(b)
    elsewhere = replace(moved.environment, device_name="Another machine", threads=64)
    moved.environment = elsewhere
    moved.results = [replace(r, environment=elsewhere) for r in moved.results]
    b_elsewhere = write_json(moved, tmp_path / "elsewhere.json")
    parts = (a, b_elsewhere, c)
    texts = {to_json(merged_of(*order).report) for order in itertools.permutations(parts)}
    assert len(texts) == 1
    merged = merged_of(*parts).report
    headers = [load_document(p).environment for p in parts]
    assert merged.environment == min(headers, key=lambda e: json.dumps(e.to_dict(), sort_keys=True))
    moved_keys = {r.key for r in moved.results}
    for record in merged.results:
        assert (record.environment == elsewhere) == (record.key in moved_keys), record.method


def test_reports_in_memory_merge_as_their_files_do(sweep):
    # compare's own report holds ints where its file, read back, holds floats (min_time=0)
    names = [str(p) for p in sweep["shards"]]
    in_memory = to_json(merge_reports(sweep["reports"], names).report)
    assert in_memory == to_json(merged_of(*sweep["shards"]).report)


def test_cli_merge_is_order_independent_and_idempotent(sweep, tmp_path):
    a, b, c = sweep["shards"]
    results = {}
    for name, order in {"abc": (a, b, c), "cab": (c, a, b), "bca": (b, c, a)}.items():
        res = invoke("merge", *order, "-o", tmp_path / f"{name}.json")
        assert res.exit_code == 0, res.stderr
        results[name] = (tmp_path / f"{name}.json").read_bytes()
    assert results["abc"] == results["cab"] == results["bca"]
    res = invoke("merge", tmp_path / "abc.json", b, "-o", tmp_path / "again.json")
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "again.json").read_bytes() == results["abc"]
    printed = invoke("merge", c, b, a)  # no -o: the document on stdout, the notes on stderr
    assert printed.exit_code == 0 and printed.stdout.encode() == results["abc"]
    assert printed.stderr.strip() == "Merged 3 files: 9 records of 9 in the grid."
    quiet = invoke("merge", c, b, a, "-q")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == printed.stdout
    # a merge may be written over one of its parts: it is read first, written whole after
    res = invoke("merge", tmp_path / "again.json", c, a, "-o", tmp_path / "again.json")
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "again.json").read_bytes() == results["abc"]


def test_a_different_grid_is_refused_naming_the_difference(sweep, tmp_path):
    qkv = synthetic(SPEC)
    other = compare(qkv, ["exact"], [32, 128], **FAST)
    other.grid = plan_grid([qkv], ["exact"], [32, 128], seeds=2).info()
    other_path = write_json(other, tmp_path / "other.json")
    a = sweep["shards"][0]
    res = invoke("merge", a, other_path, "-o", tmp_path / "all.json")
    assert res.exit_code == 2
    difference = load_document(a).grid.difference(other.grid)  # "budgets differ(s) (… vs …)"
    assert difference.startswith("different budgets") and "([32, 64] vs [32, 128])" in difference
    assert (
        res.stderr.strip() == f"Error: {other_path} is of a different grid than {a}: {difference}."
    )
    assert "Traceback" not in res.stderr and not (tmp_path / "all.json").exists()


def test_a_file_without_a_grid_is_refused(sweep, tmp_path):
    bare = edited(sweep["full"], tmp_path / "bare.json", lambda doc: doc.pop("grid"))
    res = invoke("merge", sweep["shards"][0], bare)
    assert res.exit_code == 2 and res.stdout == ""
    assert f"Error: {bare} has no grid: it was written by `kdecli compare` before 0.6" in res.stderr
    assert "Hint: Rerun that sweep" in res.stderr and "Traceback" not in res.stderr
    assert invoke("merge").exit_code == 2  # no files at all


def test_a_scale_or_drift_document_is_refused_by_its_kind(sweep, tmp_path):
    """Merge joins the shards of `kdecli compare`: another kind of document is named as such."""
    for kind in ("scale", "drift"):
        other = tmp_path / f"{kind}.json"
        other.write_text(json.dumps({"document": kind, "schema_version": 1, "results": []}))
        res = invoke("merge", sweep["shards"][0], other)
        assert res.exit_code == 2 and "Traceback" not in res.stderr
        assert f"Error: {other}: is a `kdecli {kind}` document, not `kdecli compare`" in res.stderr


def test_records_without_a_key_or_outside_the_grid_are_refused(sweep, tmp_path):
    unkeyed = edited(sweep["full"], tmp_path / "unkeyed.json", lambda d: d["results"][1].pop("key"))
    with pytest.raises(SchemaError, match=r"unkeyed.json: the record kdeformer budget=32 seed=0 "):
        merged_of(unkeyed)

    def stranger(doc):
        doc["results"][1]["key"] = "0123456789abcdef"

    outside = edited(sweep["full"], tmp_path / "outside.json", stranger)
    with pytest.raises(SchemaError, match="key 0123456789abcdef.* is not in the file's grid"):
        merged_of(outside)


def test_identical_duplicates_are_dropped_and_counted(sweep, tmp_path):
    a = sweep["shards"][0]
    merged = merged_of(*sweep["shards"], sweep["full"], a)
    held = len(load_document(a).results)
    assert merged.duplicates_dropped == 9 + held  # the whole run again, and shard 0 twice
    assert len(merged.report.results) == 9 and merged.conflicts == ()
    res = invoke("merge", *sweep["shards"], sweep["full"], a, "-o", tmp_path / "all.json")
    assert res.exit_code == 0
    assert res.stderr.strip() == (
        f"Merged 5 files into {tmp_path / 'all.json'}: 9 records of 9 in the grid; "
        f"{9 + held} identical duplicates dropped."
    )


def test_last_bits_are_not_a_conflict_but_a_digit_is(sweep, tmp_path):
    """Another thread count changes an SVD's last bits (up to 1.8e-6 relative on GloVe): within
    TOLERANCE (1e-4 relative) is the same measurement; 1e-3 is not."""
    full = sweep["full"]
    doc = json.loads(full.read_text())
    index = next(i for i, r in enumerate(doc["results"]) if r["method"] == "performer")

    def scaled(factor):
        def edit(doc):
            errors = doc["results"][index]["errors"]["rel_spectral"]
            errors["mean"] *= factor
            errors["per_slice"] = [v * factor for v in errors["per_slice"]]

        return edit

    noisy = edited(full, tmp_path / "noisy.json", scaled(1 + 2e-6))
    merged = merged_of(full, noisy)
    assert merged.conflicts == () and merged.duplicates_dropped == 9
    again = merged_of(noisy, full)
    assert again.report.to_dict() == merged.report.to_dict()  # either order keeps the same one
    other = edited(full, tmp_path / "other.json", scaled(1 + 1e-3))
    conflicted = merged_of(full, other)
    (conflict,) = conflicted.conflicts
    kept = next(r for r in conflicted.report.results if r.key == conflict.key)
    assert differences(kept, *conflict.records).startswith("errors.rel_spectral.mean")


def test_a_conflict_is_reported_and_kept_deterministically(sweep, tmp_path):
    full = sweep["full"]
    doc = json.loads(full.read_text())
    index = next(i for i, r in enumerate(doc["results"]) if r["method"] == "performer")
    record = doc["results"][index]
    original = record["errors"]["rel_spectral"]["mean"]

    def tamper(doc):
        doc["results"][index]["errors"]["rel_spectral"]["mean"] = original * 2

    tampered = edited(full, tmp_path / "tampered.json", tamper)
    job = f"performer budget={record['budget']} seed={record['seed']}"
    outputs, messages = [], []
    for order in ((full, tampered), (tampered, full)):
        res = invoke("merge", *order, "-o", tmp_path / "all.json")
        assert res.exit_code == 0, res.stderr
        outputs.append((tmp_path / "all.json").read_bytes())
        messages.append([" ".join(line.split()) for line in res.stderr.strip().split("\n")])
    assert outputs[0] == outputs[1] and messages[0] == messages[1]
    merged = load_document(tmp_path / "all.json")
    kept = next(r for r in merged.results if r.key == record["key"])
    (conflict,) = merged.merge.conflicts
    assert conflict.key == record["key"] and conflict.job.describe() == job
    both = sorted([kept, *conflict.records], key=lambda r: json.dumps(r.to_dict(), sort_keys=True))
    assert kept == both[0] and measurement(kept) != measurement(conflict.records[0])
    assert {kept.error("rel_spectral"), conflict.records[0].error("rel_spectral")} == {
        original,
        original * 2,
    }
    values = f"{kept.error('rel_spectral'):.6g} vs {conflict.records[0].error('rel_spectral'):.6g}"
    assert messages[0] == [
        f"Merged 2 files into {tmp_path / 'all.json'}: 9 records of 9 in the grid; "
        "8 identical duplicates dropped; 1 conflict.",
        f"Warning: {job}: 2 different measurements (errors.rel_spectral.mean {values}); "
        "kept one, the other under merge.conflicts.",
    ]
    # re-merged with either side or with itself: nothing changes
    for extra in (full, tampered, tmp_path / "all.json"):
        assert to_json(merged_of(tmp_path / "all.json", extra).report) + "\n" == outputs[0].decode()


def test_an_ok_retry_supersedes_a_failure(sweep, tmp_path):
    a = sweep["shards"][0]
    doc = json.loads(a.read_text())
    key = doc["results"][0]["key"]

    def fail(doc):
        doc["results"][0] |= {"status": "error", "reason": "RuntimeError: boom", "errors": {}}
        doc["results"][0]["time"] = None

    failed = edited(a, tmp_path / "failed.json", fail)
    alone = merged_of(failed, *sweep["shards"][1:])
    assert next(r for r in alone.report.results if r.key == key).status == "error"
    assert alone.missing == () and alone.superseded == 0  # a failure is a record, not a gap
    for order in ((failed, a), (a, failed)):
        merged = merged_of(*order, *sweep["shards"][1:])
        assert next(r for r in merged.report.results if r.key == key).status == "ok"
        assert merged.superseded == 1 and merged.conflicts == ()
    res = invoke("merge", failed, *sweep["shards"], "-o", tmp_path / "all.json")
    assert res.exit_code == 0 and "1 failed record superseded" in res.stderr
    assert (tmp_path / "all.json").read_text() == to_json(merged_of(*sweep["shards"]).report) + "\n"


def test_missing_records_are_listed_in_grid_order(sweep, tmp_path):
    a, b, c = sweep["shards"]
    merged = merged_of(a, b)
    absent = keys_of(sweep["grid"].shard(2, 3))
    assert [job.key for job in merged.missing] == [
        job.key for job in sweep["grid"].info().jobs if job.key in absent
    ]
    assert merged.report.merge.missing == merged.missing
    res = invoke("merge", b, a, "-o", tmp_path / "two.json")
    assert res.exit_code == 0, res.stderr
    held = 9 - len(absent)
    names = ", ".join(job.describe() for job in merged.missing)
    stderr = " ".join(res.stderr.split())
    assert f"{held} records of 9 in the grid." in stderr
    assert f"Warning: {len(absent)} of 9 records of the grid are in no file: {names}. Run" in stderr
    assert load_document(tmp_path / "two.json").merge.missing == merged.missing
    # the last shard merged in later fills the gap: the same as merging all three at once
    res = invoke("merge", tmp_path / "two.json", c, "-o", tmp_path / "three.json")
    assert res.exit_code == 0 and "Warning" not in res.stderr
    assert (tmp_path / "three.json").read_text() == to_json(merged_of(a, b, c).report) + "\n"


def test_the_missing_warning_names_ten_then_counts(tmp_path):
    qkv = synthetic("synthetic:n=64,d=8,b=1,h=1")
    methods, budgets = ["exact", "kdeformer", "performer"], [8, 16, 32, 64]
    grid = plan_grid([qkv], methods, budgets, seeds=2, timing=False)
    empty = compare(qkv, methods, budgets, seeds=2, timing=False, only=set())
    empty.grid = grid.info(0, 8)
    path = write_jsonl(empty, tmp_path / "empty.jsonl")
    res = invoke("merge", path, "-o", tmp_path / "all.json")
    assert res.exit_code == 0, res.stderr
    entries = grid.info().jobs
    assert len(entries) == 17
    names = ", ".join(job.describe() for job in entries[:10])
    stderr = " ".join(res.stderr.split())
    assert f"17 of 17 records of the grid are in no file: {names}, and 7 more. Run" in stderr
    assert entries[10].describe() not in stderr


def test_a_truncated_jsonl_part_merges(sweep, tmp_path):
    a, b, c = sweep["shards"]
    text = b.read_text()
    cut = tmp_path / "cut.jsonl"
    cut.write_text(text[: len(text) - 40])  # the last record cut short, as by a crash
    lost = load_document(b).results[-1]
    merged = merged_of(a, cut, c)
    assert [job.key for job in merged.missing] == [lost.key]
    assert len(merged.report.results) == 8
    res = invoke("merge", a, cut, c, "-o", tmp_path / "all.json")
    assert res.exit_code == 0, res.stderr
    assert "8 records of 9 in the grid" in res.stderr and lost.method in res.stderr


def test_report_and_plot_read_the_merged_file(sweep, tmp_path):
    pytest.importorskip("matplotlib")
    merged = tmp_path / "all.json"
    assert invoke("merge", *sweep["shards"], "-o", merged).exit_code == 0
    shown = invoke("report", merged, "--format", "csv")
    assert shown.exit_code == 0, shown.stderr
    rows = shown.stdout.strip().split("\n")[1:]
    assert len(rows) == 9 and sum(row.startswith("performer,") for row in rows) == 4
    table = invoke("report", merged)
    assert table.exit_code == 0 and "kdeformer" in table.stdout
    image = tmp_path / "x.png"
    drawn = invoke("plot", merged, "-o", image)
    assert drawn.exit_code == 0, drawn.stderr
    assert image.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_layers_are_united_and_the_header_is_the_first_layers(tmp_path):
    layers = [
        replace(synthetic(f"synthetic:n=64,d=8,b=1,h=1,seed={seed}"), layer=layer)
        for seed, layer in ((0, 2), (1, 5))
    ]
    methods, budgets = ["exact", "performer"], [16]
    settings = {"seeds": 2, "timing": False}
    grid = plan_grid(layers, methods, budgets, **settings)
    full = compare_layers(layers, methods, budgets, **settings)
    paths = []
    for i in range(3):
        part = compare_layers(layers, methods, budgets, only=keys_of(grid.shard(i, 3)), **settings)
        part.grid = grid.info(i, 3)
        paths.append(write_jsonl(part, tmp_path / f"part{i}.jsonl"))
    firsts = {load_document(p).layers[0].layer for p in paths}
    assert firsts == {2, 5}, "some shard must start at the second layer for this test to judge"
    texts = {to_json(merged_of(*order).report) for order in itertools.permutations(paths)}
    assert len(texts) == 1
    merged = merged_of(*paths).report
    assert [x.to_dict() for x in merged.layers] == [x.to_dict() for x in full.layers]
    assert merged.input == full.layers[0].input and merged.floors == full.layers[0].floors
    errors = {r.key: (r.layer, r.errors) for r in full.results}
    assert {r.key: (r.layer, r.errors) for r in merged.results} == errors
