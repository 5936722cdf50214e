"""Sink: atomic part commit, done markers, what pyarrow.dataset readers see, orphan cleanup."""

import os
import time

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from po_batch.data.sink import clean_orphans, commit_unit, done_units, is_done, part_path


def _table(ids):
    return pa.table({"id": ids, "score": [i / 10 for i in ids], "error": pa.nulls(len(ids), pa.string())})


def _stats(rows, errors=0):
    return {"rows": rows, "errors": errors, "error_kinds": {}, "started_at": 1.0, "finished_at": 2.0, "owner": "w"}


def test_commit_unit_writes_part_then_marker(tmp_path):
    out = str(tmp_path)
    assert not is_done(out, "u1")
    commit_unit(out, "u1", _table([1, 2, 3]), _stats(3))
    assert part_path(out, "u1") == os.path.join(out, "part-u1.parquet")
    assert pq.read_table(part_path(out, "u1")).column("id").to_pylist() == [1, 2, 3]
    assert is_done(out, "u1")
    assert done_units(out) == {"u1": {"unit": "u1", **_stats(3)}}
    assert sorted(os.listdir(out)) == ["_po_batch", "part-u1.parquet"]
    assert os.listdir(os.path.join(out, "_po_batch", "done")) == ["u1.json"]


def test_recommit_replaces_the_part_so_rows_appear_once(tmp_path):
    out = str(tmp_path)
    commit_unit(out, "u1", _table([1, 2]), _stats(2))
    commit_unit(out, "u1", _table([1, 2]), _stats(2))
    assert ds.dataset(out).to_table().column("id").to_pylist() == [1, 2]


def test_dataset_reader_sees_only_committed_parts(tmp_path):
    out = str(tmp_path)
    commit_unit(out, "u1", _table([1, 2]), _stats(2))
    commit_unit(out, "u2", _table([3]), _stats(1))
    # what a crashed or in-flight writer leaves: a temporary part, half written
    (tmp_path / ".part-u3.0123456789ab.tmp").write_bytes(b"PAR1 half a file")
    # po-batch's own state and temporary markers
    (tmp_path / "_po_batch" / "done" / ".u3.json.0123.tmp").write_text("{")
    dataset = ds.dataset(out, format="parquet")
    assert sorted(os.path.basename(f) for f in dataset.files) == ["part-u1.parquet", "part-u2.parquet"]
    assert sorted(dataset.to_table().column("id").to_pylist()) == [1, 2, 3]
    assert set(done_units(out)) == {"u1", "u2"}


def test_failed_write_leaves_no_part_and_no_marker(tmp_path):
    out = str(tmp_path)
    types = pa.array([0, 1], type=pa.int8())
    union = pa.UnionArray.from_sparse(types, [pa.array([1, 2]), pa.array(["a", "b"])])  # Parquet has no unions
    with pytest.raises(pa.ArrowNotImplementedError):
        commit_unit(out, "u1", pa.table({"u": union}), _stats(2))
    assert os.listdir(out) == [] and not is_done(out, "u1")


def test_marker_without_part_is_not_done(tmp_path):
    out = str(tmp_path)
    commit_unit(out, "u1", _table([1]), _stats(1))
    os.remove(part_path(out, "u1"))
    assert not is_done(out, "u1") and done_units(out) == {}


def test_clean_orphans_removes_only_old_temporaries(tmp_path):
    out = str(tmp_path)
    commit_unit(out, "u1", _table([1]), _stats(1))
    old, new = tmp_path / ".part-u2.aaaa.tmp", tmp_path / ".part-u3.bbbb.tmp"
    old_marker = tmp_path / "_po_batch" / "done" / ".u2.json.cccc.tmp"
    unmarked = tmp_path / "part-u4.parquet"  # renamed, marker not yet written
    claims = tmp_path / "_po_batch" / "claims"
    claims.mkdir()
    tomb, claim = claims / "u5.claim.0a1b2c.tomb", claims / "u6.claim"  # a takeover killed mid-way; a live claim
    for p in (old, new, old_marker, unmarked, tomb, claim):
        p.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    for p in (old, old_marker, unmarked, tomb, claim):
        os.utime(p, (two_hours_ago, two_hours_ago))
    clean_orphans(out)
    assert os.listdir(claims) == ["u6.claim"]  # stale claims are taken over, not deleted here
    assert sorted(os.listdir(out)) == [".part-u3.bbbb.tmp", "_po_batch", "part-u1.parquet", "part-u4.parquet"]
    assert os.listdir(tmp_path / "_po_batch" / "done") == ["u1.json"]
    assert is_done(out, "u1")
