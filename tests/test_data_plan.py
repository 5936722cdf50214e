"""Plan: input listing, unit cutting, the stored plan and its fingerprint; reading a unit's rows."""

import json
import multiprocessing as mp
import os
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from po_batch.data.plan import PlanError, Unit, load_or_create_plan
from po_batch.data.readers.base import UnitReadError
from po_batch.data.readers.listing import list_inputs
from po_batch.data.readers.parquet import check_unique_ids, cut_units, read_unit, resolve_path
from po_batch.data.sink import Sink
from po_batch.data.store import LocalStore


def write_parquet(path, group_sizes: list[int], first_id: int = 0) -> str:
    """One row group per size; column 'id' counts rows from first_id."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    schema = pa.schema([("id", pa.int64()), ("image", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        start = first_id
        for n in group_sizes:
            ids = list(range(start, start + n))
            w.write_table(pa.table({"id": ids, "image": [f"img/{i}.jpg" for i in ids]}, schema=schema))
            start += n
    return str(path)


def test_cut_units_groups_small_row_groups_and_splits_big_ones(tmp_path):
    f = write_parquet(tmp_path / "a.parquet", [10, 10, 10, 100, 5, 5])
    assert pq.ParquetFile(f).metadata.num_row_groups == 6
    assert cut_units(f, 25) == [(0, 20), (20, 30), (30, 55), (55, 80), (80, 105), (105, 130), (130, 140)]
    assert cut_units(f, 1000) == [(0, 140)]


def test_cut_units_of_empty_file_is_empty(tmp_path):
    f = write_parquet(tmp_path / "empty.parquet", [])
    assert cut_units(f, 10) == []


def test_plan_over_three_files_covers_every_row_once(tmp_path):
    sizes = [[7, 7, 7, 7], [64, 3], [1, 2, 3, 40, 0, 9]]
    files = [write_parquet(tmp_path / "in" / f"{i}.parquet", s) for i, s in enumerate(sizes)]
    plan = load_or_create_plan(LocalStore(tmp_path / "out"), [str(tmp_path / "in")], 16, {"m": 1})
    assert sum(u.rows for u in plan.units) == sum(map(sum, sizes))
    assert len({u.id for u in plan.units}) == len(plan.units)
    for i, f in enumerate(files):
        ranges = [(u.row_start, u.row_stop) for u in plan.units if u.file == f]
        assert ranges[0][0] == 0 and ranges[-1][1] == sum(sizes[i])
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous
        assert all(0 < b - a <= 16 for a, b in ranges)
    assert [(u.row_start, u.row_stop) for u in plan.units if u.file == files[0]] == [(0, 14), (14, 28)]
    assert plan.units[0].id == "f00000-r000000000"
    assert plan.units[2] == Unit("f00001-r000000000", files[1], 0, 16)
    assert plan.units[-1].id == "f00002-r000000046"
    doc = json.loads((tmp_path / "out" / "_po_batch" / "plan.json").read_text())
    assert doc["version"] == 2 and doc["rows_per_unit"] == 16 and doc["fingerprint"] == {"m": 1}
    assert doc["epoch"] == plan.epoch and len(plan.epoch) == 32
    assert [f["path"] for f in doc["files"]] == files and doc["files"][2]["rows"] == 55


def test_list_inputs_takes_globs_dirs_and_urls_sorted_and_unique(tmp_path, monkeypatch):
    a = write_parquet(tmp_path / "d" / "a.parquet", [3])
    b = write_parquet(tmp_path / "d" / "sub" / "b.parquet", [3])
    write_parquet(tmp_path / "d" / "_state" / "c.parquet", [3])  # hidden like pyarrow.dataset
    (tmp_path / "d" / "notes.txt").write_text("x")
    assert list_inputs([str(tmp_path / "d")]) == [a, b]
    assert list_inputs([str(tmp_path / "d" / "*.parquet"), a, f"file://{b}"]) == [a, b]
    assert list_inputs([str(tmp_path / "d" / "**" / "b.parquet")]) == [b]
    monkeypatch.chdir(tmp_path)
    assert list_inputs(["d/sub/b.parquet"]) == [b]

    root = f"memory://po-batch-{uuid.uuid4().hex}"
    for name in ("x/1.parquet", "x/2.parquet"):
        with fsspec.open(f"{root}/{name}", "wb") as f:
            pq.write_table(pa.table({"id": [1, 2]}), f)
    urls = list_inputs([f"{root}/x"])
    assert urls == [f"memory:///{root[9:]}/x/1.parquet", f"memory:///{root[9:]}/x/2.parquet"]
    assert list_inputs([f"{root}/x/*.parquet"]) == urls
    assert cut_units(urls[0], 10) == [(0, 2)]

    with pytest.raises(PlanError, match="nothing.parquet"):
        list_inputs([a, str(tmp_path / "nothing.parquet")])
    with pytest.raises(PlanError, match=r"d/\*\.csv matches no file"):
        list_inputs([str(tmp_path / "d" / "*.csv")])


def commit_first_unit(store, plan) -> None:
    unit = plan.units[0]
    Sink(store, plan).commit(unit.id, pa.table({"id": list(range(unit.row_start, unit.row_stop))}), {
        "rows": unit.rows, "errors": 0, "error_kinds": {}, "started_at": 1.0, "finished_at": 2.0, "owner": "w"})


def test_changed_fingerprint_is_refused_naming_the_key_once_a_unit_is_committed(tmp_path):
    write_parquet(tmp_path / "in" / "a.parquet", [10])
    out, inputs = LocalStore(tmp_path / "out"), [str(tmp_path / "in")]
    fp = {"model": {"path": "m", "dtype": "bf16"}, "task": {"prompt": "A"}}
    plan = load_or_create_plan(out, inputs, 4, fp)
    commit_first_unit(out, plan)
    assert load_or_create_plan(out, inputs, 4, fp) == plan  # same fingerprint resumes
    changed = {"model": {"path": "m", "dtype": "bf16"}, "task": {"prompt": "B"}, "seed": 1}
    with pytest.raises(PlanError) as e:
        load_or_create_plan(out, inputs, 4, changed)
    assert str(e.value) == (
        f"output {out.root} was planned with a different seed (unset -> 1), task.prompt ('A' -> 'B'); "
        "rerun with --restart to discard its results"
    )


def test_restart_wipes_results_and_replans(tmp_path):
    write_parquet(tmp_path / "in" / "a.parquet", [10])
    out, inputs = tmp_path / "out", [str(tmp_path / "in")]
    old = load_or_create_plan(LocalStore(out), inputs, 4, {"p": "A"})
    (out / "part-f00000-r000000000.parquet").write_text("old")
    (out / "_po_batch" / "done").mkdir()
    (out / "_po_batch" / "done" / "f00000-r000000000.json").write_text("{}")
    (out / "mine.txt").write_text("the user's")
    plan = load_or_create_plan(LocalStore(out), inputs, 5, {"p": "B"}, restart=True)
    assert plan.fingerprint == {"p": "B"} and [u.rows for u in plan.units] == [5, 5]
    assert plan.epoch != old.epoch
    assert sorted(os.listdir(out)) == ["_po_batch", "mine.txt"]
    assert sorted(os.listdir(out / "_po_batch")) == ["plan.json", "plan.lock"]


def test_new_input_file_becomes_new_units_without_renumbering(tmp_path):
    write_parquet(tmp_path / "in" / "b.parquet", [10])
    out, inputs = LocalStore(tmp_path / "out"), [str(tmp_path / "in" / "*.parquet")]
    before = load_or_create_plan(out, inputs, 4, {})
    write_parquet(tmp_path / "in" / "a.parquet", [6])  # sorts first, yet comes after the planned file
    after = load_or_create_plan(out, inputs, 4, {})
    assert after.units[: len(before.units)] == before.units
    assert [(u.id, u.rows) for u in after.units[len(before.units) :]] == [
        ("f00001-r000000000", 3),
        ("f00001-r000000003", 3),
    ]
    assert load_or_create_plan(out, inputs, 4, {}) == after


def _plan_in_child(out, inputs, go, results):
    go.wait()
    plan = load_or_create_plan(LocalStore(out), inputs, 7, {"k": "v"})
    results.put([plan.epoch] + [(u.id, u.file, u.row_start, u.row_stop) for u in plan.units])


def test_racing_processes_agree_on_one_plan(tmp_path):
    for i in range(3):
        write_parquet(tmp_path / "in" / f"{i}.parquet", [5, 20, 5])
    ctx = mp.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    args = (str(tmp_path / "out"), [str(tmp_path / "in")], go, results)
    procs = [ctx.Process(target=_plan_in_child, args=args) for _ in range(4)]
    for p in procs:
        p.start()
    go.set()
    plans = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert all(p == plans[0] for p in plans) and len(plans[0]) == 1 + 3 * 5


def test_read_unit_returns_exactly_the_range_across_row_groups(tmp_path):
    f = write_parquet(tmp_path / "a.parquet", [10, 3, 25, 1, 11])
    for start, stop in [(0, 50), (5, 12), (10, 13), (9, 40), (38, 39), (12, 50), (20, 21)]:
        unit = Unit("u", f, start, stop)
        batches = list(read_unit(unit, ["id"], batch_rows=4))
        assert all(b.num_rows <= 4 and b.schema.names == ["id"] for b in batches)
        assert [i for b in batches for i in b.column("id").to_pylist()] == list(range(start, stop))


def test_read_unit_names_missing_column_and_changed_file(tmp_path):
    f = write_parquet(tmp_path / "a.parquet", [10])
    with pytest.raises(PlanError, match=f"column 'url' not found in {f}"):
        list(read_unit(Unit("u", f, 0, 10), ["id", "url"]))
    with pytest.raises(PlanError, match="has 10 rows but unit u reads up to row 12"):
        list(read_unit(Unit("u", f, 0, 12), ["id"]))


def test_read_unit_over_fsspec_url():
    url = f"memory://po-batch-{uuid.uuid4().hex}/a.parquet"
    with fsspec.open(url, "wb") as f:
        pq.write_table(pa.table({"id": list(range(100))}), f, row_group_size=30)
    batches = read_unit(Unit("u", url, 25, 65), ["id"], batch_rows=8)
    assert [i for b in batches for i in b.column("id").to_pylist()] == list(range(25, 65))


def test_resolve_path_against_the_parquet_folder():
    assert resolve_path("img/a.jpg", "/data/x/shard.parquet") == "/data/x/img/a.jpg"
    assert resolve_path("../a.jpg", "/data/x/shard.parquet") == "/data/a.jpg"
    assert resolve_path("/abs/a.jpg", "/data/x/shard.parquet") == "/abs/a.jpg"
    assert resolve_path("https://h/a.jpg", "/data/x/shard.parquet") == "https://h/a.jpg"
    assert resolve_path("img/a.jpg", "s3://bucket/x/shard.parquet") == "s3://bucket/x/img/a.jpg"
    assert resolve_path("../a.jpg", "memory:///x/y/s.parquet") == "memory:///x/a.jpg"


def test_check_unique_ids_names_file_unit_and_duplicate():
    unit = Unit("f00001-r000000000", "/data/a.parquet", 0, 4)
    check_unique_ids(["a", "b", "c"], unit, "key")
    with pytest.raises(PlanError, match=r"/data/a.parquet: unit f00001-r000000000 .* repeats key 'b'"):
        check_unique_ids(["a", "b", "c", "b"], unit, "key")


def test_plan_with_nothing_committed_gives_way_to_a_changed_config(tmp_path):
    """A config error found after planning (a missing column, a bad prompt) must not leave a plan that then refuses
    the fixed config: until a unit is committed the plan does not lock its fingerprint."""
    write_parquet(tmp_path / "in" / "a.parquet", [10])
    out, inputs = LocalStore(tmp_path / "out"), [str(tmp_path / "in")]
    first = load_or_create_plan(out, inputs, 4, {"input.columns": ["colour"]})
    (tmp_path / "out" / "part-f00000-r000000000.parquet").write_bytes(b"renamed, its marker never written")
    fixed = load_or_create_plan(out, inputs, 4, {"input.columns": ["color"]})
    assert fixed.fingerprint == {"input.columns": ["color"]} and fixed.epoch != first.epoch
    assert not (tmp_path / "out" / "part-f00000-r000000000.parquet").exists()
    assert load_or_create_plan(out, inputs, 4, {"input.columns": ["color"]}) == fixed


def test_input_that_changed_after_planning_is_refused_naming_it(tmp_path):
    a = write_parquet(tmp_path / "in" / "a.parquet", [10])
    out, inputs = LocalStore(tmp_path / "out"), [str(tmp_path / "in")]
    plan = load_or_create_plan(out, inputs, 4, {})

    os.utime(a, (1e9, 1e9))  # touched (copied without -p): same bytes, so still the planned file
    assert load_or_create_plan(out, inputs, 4, {}) == plan
    b = tmp_path / "in" / "b.parquet"  # a new file is new units, as always

    def fixed_size(first_id):  # uncompressed, plain int64: the same size whatever the ids
        pq.write_table(pa.table({"id": list(range(first_id, first_id + 6))}), b, compression="none",
                       use_dictionary=False)

    fixed_size(0)
    assert len(load_or_create_plan(out, inputs, 4, {}).units) == len(plan.units) + 2

    write_parquet(tmp_path / "in" / "a.parquet", [10, 5])  # rows appended
    with pytest.raises(PlanError) as e:
        load_or_create_plan(out, inputs, 4, {})
    assert str(e.value).startswith(f"input {a} changed after it was planned (size ")
    assert "rows 10 -> 15" in str(e.value) and "--restart" in str(e.value) and "\n" not in str(e.value)

    write_parquet(tmp_path / "in" / "a.parquet", [10])
    size = os.path.getsize(b)
    fixed_size(1)  # replaced: same size and rows, other ids
    assert os.path.getsize(b) == size
    os.utime(b, (1e9, 1e9))
    with pytest.raises(PlanError, match=f"input {b} changed after it was planned \\(its Parquet footer differs\\)"):
        load_or_create_plan(out, inputs, 4, {})


def test_list_inputs_never_lists_its_own_output_or_state(tmp_path):
    a = write_parquet(tmp_path / "d" / "a.parquet", [3])
    out = tmp_path / "d" / "out"
    write_parquet(out / "part-f00000-r000000000.parquet", [3])
    write_parquet(out / "_po_batch" / "stray.parquet", [3])
    other = write_parquet(tmp_path / "d" / "old-run" / "part-f00000-r000000000.parquet", [3])  # not ours: data
    for pattern in [str(tmp_path / "d"), str(tmp_path / "d" / "**" / "*.parquet")]:
        assert list_inputs([pattern], exclude=str(out)) == [a, other]
    with pytest.raises(PlanError, match="matches no file"):
        list_inputs([str(out / "_po_batch" / "*.parquet")], exclude=str(out))


def test_unreadable_input_is_left_out_of_the_plan_and_tried_again(tmp_path):
    write_parquet(tmp_path / "in" / "a.parquet", [10])
    bad = tmp_path / "in" / "b.parquet"
    good = write_parquet(tmp_path / "b-good.parquet", [7])
    bad.write_bytes(open(good, "rb").read()[:-30])  # a copy cut short: no footer
    out, inputs = LocalStore(tmp_path / "out"), [str(tmp_path / "in")]
    plan = load_or_create_plan(out, inputs, 5, {})
    assert [u.id for u in plan.units] == ["f00000-r000000000", "f00000-r000000005"]
    assert list(plan.unreadable) == [str(bad)] and "cannot read Parquet file" in plan.unreadable[str(bad)]

    os.replace(good, bad)  # the copy finished
    again = load_or_create_plan(out, inputs, 5, {})
    assert again.unreadable == {} and again.epoch == plan.epoch
    assert [u.id for u in again.units] == [*(u.id for u in plan.units), "f00001-r000000000", "f00001-r000000003"]


def test_read_unit_of_a_corrupt_page_raises_unit_read_error_naming_unit_and_file(tmp_path):
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": list(range(100)), "s": [f"value-{i}" * 5 for i in range(100)]}), f,
                   row_group_size=50)
    col = pq.read_metadata(f).row_group(0).column(1)
    data = bytearray(f.read_bytes())
    middle = (col.dictionary_page_offset or col.data_page_offset) + col.total_compressed_size // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])  # the footer stays intact
    f.write_bytes(bytes(data))
    assert cut_units(str(f), 50) == [(0, 50), (50, 100)]
    bad, good = Unit("f00000-r000000000", str(f), 0, 50), Unit("f00000-r000000050", str(f), 50, 100)
    with pytest.raises(UnitReadError) as e:
        list(read_unit(bad, ["id", "s"]))
    assert e.value.unit == bad and str(e.value).startswith(f"cannot read unit {bad.id} (rows 0-50 of {f}): OSError")
    assert [i for b in read_unit(good, ["id", "s"]) for i in b.column("id").to_pylist()] == list(range(50, 100))
    f.write_bytes(bytes(data[:40]))  # truncated after planning
    with pytest.raises(UnitReadError):
        list(read_unit(good, ["id"]))
