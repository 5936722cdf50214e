"""Input column types at planning: one output schema over files whose types differ losslessly, parts cast to it so
that they read together, and one-line refusals for columns po-batch cannot use."""

import os

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from po_batch.data.readers.parquet import read_unit
from po_batch.data.plan import PlanError, load_or_create_plan
from po_batch.data.schema import Columns, unify
from po_batch.data.sink import Sink
from po_batch.data.store import LocalStore

COLUMNS = Columns("id", "image", ("n", "note"))


def write(path, **columns) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return str(path)


def plan_of(tmp_path, columns=COLUMNS):
    return load_or_create_plan(LocalStore(tmp_path / "out"), [str(tmp_path / "in")], 100, {}, columns=columns)


def test_passthrough_types_unify_losslessly_and_every_part_reads_together(tmp_path):
    write(tmp_path / "in" / "a.parquet", id=pa.array([1, 2], pa.int32()), image=pa.array([b"x", b"y"]),
          n=pa.array([1, 2], pa.int32()), note=pa.nulls(2))
    write(tmp_path / "in" / "b.parquet", id=pa.array([3], pa.int64()), image=pa.array(["c.jpg"]),
          n=pa.array([2**40], pa.int64()), note=pa.array(["hello"]))
    plan = plan_of(tmp_path)
    assert plan.schema == pa.schema([("id", pa.int64()), ("n", pa.int64()), ("note", pa.string())])
    store = LocalStore(tmp_path / "out")
    sink = Sink(store, plan)
    for unit in plan.units:
        table = pa.Table.from_batches(list(read_unit(unit, COLUMNS.output)))
        table = table.append_column("p_yes", pa.array([0.5] * unit.rows))
        sink.commit(unit.id, table, {"rows": unit.rows, "errors": 0, "error_kinds": {}, "started_at": 1.0,
                                     "finished_at": 2.0, "owner": "w"})
    out = ds.dataset(str(tmp_path / "out"), format="parquet").to_table().sort_by("id")
    assert out.to_pydict() == {"id": [1, 2, 3], "n": [1, 2, 2**40], "note": [None, None, "hello"],
                               "p_yes": [0.5, 0.5, 0.5]}
    for f in (tmp_path / "out").glob("part-*.parquet"):
        assert pq.read_schema(f).field("n").type == pa.int64()


def test_conflicting_passthrough_types_are_refused_naming_files_and_column(tmp_path):
    a = write(tmp_path / "in" / "a.parquet", id=[1], image=[b"x"], n=[1], note=["x"])
    b = write(tmp_path / "in" / "b.parquet", id=[2], image=[b"y"], n=["one"], note=["y"])
    with pytest.raises(PlanError) as e:
        plan_of(tmp_path)
    assert str(e.value) == (f"input column 'n' is int64 in {a} but string in {b}; cast one of them "
                            "(an output column has one type)")
    assert not (tmp_path / "out" / "_po_batch" / "plan.json").exists()


def test_a_new_file_that_would_widen_a_planned_column_is_refused(tmp_path):
    write(tmp_path / "in" / "a.parquet", id=[1], image=[b"x"], n=pa.array([1], pa.int32()), note=["x"])
    plan_of(tmp_path)
    c = write(tmp_path / "in" / "c.parquet", id=[3], image=[b"z"], n=pa.array([1], pa.int64()), note=pa.nulls(1))
    with pytest.raises(PlanError, match=f"input column 'n' is int64 in {c}, wider than the int32 of the files "
                                        "planned before; cast it to that, or rerun with --restart"):
        plan_of(tmp_path)
    write(tmp_path / "in" / "c.parquet", id=[3], image=[b"z"], n=pa.array([1], pa.int8()), note=pa.nulls(1))
    assert len(plan_of(tmp_path).units) == 2  # a narrower type fits what is planned


@pytest.mark.parametrize("column, values, message", [
    ("id", pa.array([{"a": 1}]), "input.id_column 'id' is struct<a: int64> in {f}; ids must be integers or strings"),
    ("id", pa.array([[1]]), "input.id_column 'id' is list<element: int64> in {f}; ids must be integers or strings"),
    ("id", pa.nulls(1), "input.id_column 'id' is null in {f}; ids must be integers or strings"),
    ("image", pa.array([7]), "input.image_column 'image' is int64 in {f}; it must hold image bytes (binary) or "
                             "paths (string)"),
    ("note", None, "column 'note' not found in {f} (it has: id, image, n)"),
], ids=["struct-id", "list-id", "null-id", "int-image", "missing-column"])
def test_unusable_columns_are_refused_at_planning_in_one_line(tmp_path, column, values, message):
    cols = {"id": pa.array([1]), "image": pa.array([b"x"]), "n": pa.array([1]), "note": pa.array(["x"])}
    if values is None:
        del cols[column]
    else:
        cols[column] = values
    f = write(tmp_path / "in" / "a.parquet", **cols)
    with pytest.raises(PlanError) as e:
        plan_of(tmp_path)
    assert str(e.value) == message.format(f=f)
    assert not (tmp_path / "out" / "_po_batch" / "plan.json").exists()


@pytest.mark.parametrize("types, want", [
    ([pa.uint32(), pa.int8()], pa.int64()),
    ([pa.uint8(), pa.int32()], pa.int32()),
    ([pa.float32(), pa.float64()], pa.float64()),
    ([pa.string(), pa.large_string(), pa.null()], pa.large_string()),
    ([pa.uint64(), pa.int64()], None),
    ([pa.int64(), pa.float64()], None),
    ([pa.binary(), pa.string()], None),
])
def test_unify_takes_only_lossless_widenings(types, want):
    files = {f"{i}.parquet": pa.schema([("id", pa.int64()), ("x", t)]) for i, t in enumerate(types)}
    cols = Columns("id", None, ("x",))
    if want is None:
        with pytest.raises(PlanError, match="input column 'x' is"):
            unify(None, files, cols)
    else:
        assert unify(None, files, cols).field("x").type == want
