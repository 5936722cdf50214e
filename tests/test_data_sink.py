"""Sink: atomic part commit, done markers of the plan's epoch, failure records, what pyarrow.dataset readers see,
refused commits of a worker that lost its claim or its plan, orphan cleanup."""

import json
import os
import time

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from po_batch.data.claims import Claims
from po_batch.data.layout import marker_name, part_name
from po_batch.data.markers import scan
from po_batch.data.plan import load_or_create_plan
from po_batch.data.sink import LostUnit, Sink, clean_orphans
from po_batch.data.store import Fenced, LocalStore


@pytest.fixture
def plan(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [1]}), tmp_path / "in" / "a.parquet")
    return load_or_create_plan(LocalStore(tmp_path / "out"), [str(tmp_path / "in")], 10, {})


@pytest.fixture
def out(tmp_path, plan):
    return tmp_path / "out"


def _table(ids):
    return pa.table({"id": ids, "score": [i / 10 for i in ids], "error": pa.nulls(len(ids), pa.string())})


def _stats(rows, errors=0):
    return {"rows": rows, "errors": errors, "error_kinds": {}, "started_at": 1.0, "finished_at": 2.0, "owner": "w"}


def test_commit_writes_part_then_marker_of_the_epoch(out, plan):
    store = LocalStore(out)
    sink = Sink(store, plan)
    assert not sink.is_done("u1")
    sink.commit("u1", _table([1, 2, 3]), _stats(3))
    assert pq.read_table(out / "part-u1.parquet").column("id").to_pylist() == [1, 2, 3]
    assert sink.is_done("u1") and sink.done() == {"u1"}
    ledger = scan(store, plan.epoch)  # from the done index
    assert (ledger.done, ledger.rows, ledger.errors) == ({"u1"}, 3, 0)
    assert (ledger.sizes, ledger.started, ledger.finished) == ([3], [1.0], [2.0])
    assert json.loads((out / "_po_batch" / "done" / "u1.json").read_text()) == \
        {"unit": "u1", "epoch": plan.epoch, **_stats(3)}
    assert sorted(os.listdir(out)) == ["_po_batch", "part-u1.parquet"]
    assert os.listdir(out / "_po_batch" / "done") == ["u1.json"]


def test_recommit_replaces_the_part_so_rows_appear_once(out, plan):
    sink = Sink(LocalStore(out), plan)
    sink.commit("u1", _table([1, 2]), _stats(2))
    sink.commit("u1", _table([1, 2]), _stats(2))
    assert ds.dataset(str(out)).to_table().column("id").to_pylist() == [1, 2]


def test_dataset_reader_sees_only_committed_parts(out, plan):
    sink = Sink(LocalStore(out), plan)
    sink.commit("u1", _table([1, 2]), _stats(2))
    sink.commit("u2", _table([3]), _stats(1))
    # what a crashed or in-flight writer leaves: a temporary part, half written
    (out / ".part-u3.parquet.0123456789ab.tmp").write_bytes(b"PAR1 half a file")
    # po-batch's own state and temporary markers
    (out / "_po_batch" / "done" / ".u3.json.0123.tmp").write_text("{")
    dataset = ds.dataset(str(out), format="parquet")
    assert sorted(os.path.basename(f) for f in dataset.files) == ["part-u1.parquet", "part-u2.parquet"]
    assert sorted(dataset.to_table().column("id").to_pylist()) == [1, 2, 3]
    assert sink.done() == {"u1", "u2"}


def test_failed_write_leaves_no_part_and_no_marker(out, plan):
    sink = Sink(LocalStore(out), plan)
    types = pa.array([0, 1], type=pa.int8())
    union = pa.UnionArray.from_sparse(types, [pa.array([1, 2]), pa.array(["a", "b"])])  # Parquet has no unions
    with pytest.raises(pa.ArrowNotImplementedError):
        sink.commit("u1", pa.table({"u": union}), _stats(2))
    assert os.listdir(out) == ["_po_batch"] and not sink.is_done("u1")


def test_marker_without_part_is_not_done(out, plan):
    sink = Sink(LocalStore(out), plan)
    sink.commit("u1", _table([1]), _stats(1))
    os.remove(out / "part-u1.parquet")
    assert not sink.is_done("u1") and sink.done() == set()


def test_commit_of_a_unit_whose_claim_was_taken_over_is_refused(out, plan):
    """A worker suspended past the ttl must not re-commit a unit that another worker took over (and finished)."""
    store = LocalStore(out)
    slow, fast = Claims(store, "slow", plan.epoch, ttl_s=60), Claims(store, "fast", plan.epoch, ttl_s=60)
    assert slow.try_claim("u1")
    old = time.time() - 120
    os.utime(out / "_po_batch" / "claims" / "u1.claim", (old, old))
    assert fast.try_claim("u1")
    Sink(store, plan, fast).commit("u1", _table([1, 2]), _stats(2))
    before = (out / "part-u1.parquet").read_bytes(), (out / "_po_batch" / "done" / "u1.json").read_text()
    with pytest.raises(LostUnit) as e:
        Sink(store, plan, slow).commit("u1", _table([7, 8]), _stats(2))
    assert e.value.reason == "claim" and str(e.value).startswith("unit u1 was not committed: its claim was taken")
    assert ((out / "part-u1.parquet").read_bytes(), (out / "_po_batch" / "done" / "u1.json").read_text()) == before
    assert [n for n in os.listdir(out) if n.startswith(".")] == []


def test_commit_under_a_replaced_plan_is_refused_and_its_markers_do_not_count(tmp_path, out, plan):
    store = LocalStore(out)
    old = Sink(store, plan)
    old.commit("u1", _table([1]), _stats(1))
    new_plan = load_or_create_plan(store, [str(tmp_path / "in")], 10, {}, restart=True)
    with pytest.raises(LostUnit) as e:
        old.commit("u2", _table([2]), _stats(1))
    assert e.value.reason == "epoch"
    assert not (out / "part-u2.parquet").exists()
    # a marker that an old worker got in anyway (stopped right at its commit) is not done in the new plan
    new = Sink(store, new_plan)
    new.commit("u3", _table([3]), _stats(1))
    marker = {"unit": "u1", "epoch": plan.epoch, **_stats(1)}
    (out / "_po_batch" / "done" / "u1.json").write_text(json.dumps(marker))
    pq.write_table(_table([1]), out / "part-u1.parquet")
    assert not new.is_done("u1") and new.done() == {"u3"}
    assert scan(store, new_plan.epoch).other_epoch == ["u1"]


class StoppedAt:
    """A sink's epoch check that lets `meanwhile` happen at one point of the commit, as if SIGSTOP had landed
    there: on the check before the publish once it passed ('after-check'), or before the check after it
    ('after-publish')."""

    def __init__(self, sink: Sink, where: str, meanwhile):
        self.watch, self.where, self.meanwhile, self.calls = sink.watch, where, meanwhile, 0
        sink.watch = self

    def current(self) -> bool:
        self.calls += 1
        if self.calls == 2 and self.where == "after-publish":
            self.meanwhile()
        ok = self.watch.current()
        if self.calls == 1 and self.where == "after-check":
            self.meanwhile()
        return ok


def restart_and_commit(store, inputs: list[str], unit_id: str, ids: list[int]):
    """What a `--restart` run does to the unit meanwhile: wipe, plan a new epoch, commit the unit with its rows."""
    def run():
        new_plan = load_or_create_plan(store, inputs, 10, {}, restart=True)
        Sink(store, new_plan).commit(unit_id, _table(ids), _stats(len(ids)))
        done.append(new_plan.epoch)
    done = []
    return run, done


def stopped_commit_leaves_the_new_part(store, plan, inputs: list[str], where: str) -> None:
    """A worker of `plan` stopped `where` in its commit of u1 while a restart redid u1: its commit raises LostUnit
    and u1 stays the restart's."""
    old = Sink(store, plan)
    meanwhile, epochs = restart_and_commit(store, inputs, "u1", [5, 6])
    StoppedAt(old, where, meanwhile)
    with pytest.raises(LostUnit) as e:
        old.commit("u1", _table([1, 2]), _stats(2))
    assert e.value.reason == "epoch"
    assert committed(store, "u1") == ([5, 6], epochs[0])


def committed(store, unit_id: str) -> tuple[list[int], str]:
    """The unit's rows as readers of OUT see them, and its marker's epoch."""
    rows = pq.read_table(pa.BufferReader(store.read(part_name(unit_id)))).column("id").to_pylist()
    return rows, json.loads(store.read(marker_name(unit_id)))["epoch"]


@pytest.mark.parametrize("where", ["after-check", "after-publish"])
def test_a_worker_stopped_in_its_commit_while_a_restart_redid_the_unit_leaves_the_new_part(tmp_path, out, plan,
                                                                                           where):
    """SIGSTOP between the check and the rename: the restart's wipe removed the temporary, so the rename publishes
    nothing. Between the rename and the check after it: the old part was wiped, and the new one must not be
    deleted (it was, once: the restarted output lost the unit's rows, a marker without its part)."""
    stopped_commit_leaves_the_new_part(LocalStore(out), plan, [str(tmp_path / "in")], where)
    assert [n for n in os.listdir(out) if n.startswith(".")] == []


def test_a_worker_whose_marker_a_restart_wiped_half_written_leaves_the_new_part(tmp_path, out, plan, monkeypatch):
    """Stopped while writing its marker: the wipe removed the marker's temporary (Fenced), which must not make the
    old worker delete the part as it does for a full disk -- the part is the new run's by then."""
    store = LocalStore(out)
    old = Sink(store, plan)
    meanwhile, epochs = restart_and_commit(store, [str(tmp_path / "in")], "u1", [5, 6])
    put, stopped = store.put, []

    def stopped_in_put(name, data):
        if name == marker_name("u1") and not stopped:
            stopped.append(name)
            with store.open_writer(name) as w:
                w.file.write(data)
                meanwhile()
                w.commit()
        else:
            put(name, data)

    monkeypatch.setattr(store, "put", stopped_in_put)
    with pytest.raises(LostUnit) as e:
        old.commit("u1", _table([1, 2]), _stats(2))
    assert e.value.reason == "epoch" and isinstance(e.value.__context__, Fenced)
    assert committed(store, "u1") == ([5, 6], epochs[0])


def test_a_worker_stopped_after_publishing_whose_claim_was_taken_over_leaves_the_new_owners_commit(out, plan):
    """Same epoch: the new owner's part and marker stay whole (the stopped worker's rows would be the same ones)."""
    store = LocalStore(out)
    slow, fast = Claims(store, "slow", plan.epoch, ttl_s=60), Claims(store, "fast", plan.epoch, ttl_s=60)
    assert slow.try_claim("u1")
    old = Sink(store, plan, slow)

    def takeover():
        past = time.time() - 120
        os.utime(out / "_po_batch" / "claims" / "u1.claim", (past, past))
        assert fast.try_claim("u1")
        Sink(store, plan, fast).commit("u1", _table([1, 2]), _stats(2))

    StoppedAt(old, "after-publish", takeover)
    with pytest.raises(LostUnit) as e:
        old.commit("u1", _table([1, 2]), _stats(2))
    assert e.value.reason == "claim"
    assert committed(store, "u1") == ([1, 2], plan.epoch)
    assert json.loads(store.read(marker_name("u1")))["owner"] == "w" and Sink(store, plan).is_done("u1")


def test_failure_record_is_not_done_and_a_commit_removes_it(out, plan):
    store = LocalStore(out)
    sink = Sink(store, plan)
    sink.mark_failed("u1", "cannot read unit u1 (rows 0-10 of a.parquet): OSError: Corrupt snappy data", "w")
    assert not sink.is_done("u1")
    assert scan(store, plan.epoch).failed == {"u1": "cannot read unit u1 (rows 0-10 of a.parquet): OSError: "
                                                    "Corrupt snappy data"}
    sink.commit("u1", _table([1]), _stats(1))
    assert scan(store, plan.epoch).failed == {} and sink.is_done("u1")
    assert os.listdir(out / "_po_batch" / "failed") == []


def test_clean_orphans_removes_only_old_temporaries(out, plan):
    sink = Sink(LocalStore(out), plan)
    sink.commit("u1", _table([1]), _stats(1))
    old, new = out / ".part-u2.parquet.aaaaaaaaaaaa.tmp", out / ".part-u3.parquet.bbbbbbbbbbbb.tmp"
    old_marker = out / "_po_batch" / "done" / ".u2.json.cccccccccccc.tmp"
    unmarked = out / "part-u4.parquet"  # renamed, marker not yet written
    users = out / ".my.bad.tmp"  # not a name po-batch makes
    claims = out / "_po_batch" / "claims"
    claims.mkdir()
    tomb, claim = claims / "u5.claim.0a1b2c3d4e5f.tomb", claims / "u6.claim"  # a takeover killed mid-way; a live one
    for p in (old, new, old_marker, unmarked, users, tomb, claim):
        p.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    for p in (old, old_marker, unmarked, users, tomb, claim):
        os.utime(p, (two_hours_ago, two_hours_ago))
    clean_orphans(LocalStore(out))
    assert os.listdir(claims) == ["u6.claim"]  # stale claims are taken over, not deleted here
    assert sorted(os.listdir(out)) == [".my.bad.tmp", ".part-u3.parquet.bbbbbbbbbbbb.tmp", "_po_batch",
                                       "part-u1.parquet", "part-u4.parquet"]
    assert os.listdir(out / "_po_batch" / "done") == ["u1.json"]
    assert sink.is_done("u1")
