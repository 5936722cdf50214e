"""Status: counts, errors, rate and ETA from the plan, claims, done index and markers; what it says of unreadable
markers, dead and expired claims, failed units and a stopped run; and its speed at 100k units."""

import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from po_batch.data.claims import Claims, default_owner
from po_batch.data.markers import index_line
from po_batch.data.plan import PlanError, load_or_create_plan
from po_batch.data.sink import Sink
from po_batch.data.status import read_status
from po_batch.data.store import LocalStore


def _plan(tmp_path, rows=100, rows_per_unit=10, row_group_size=10):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": list(range(rows))}), tmp_path / "in" / "a.parquet", row_group_size=row_group_size)
    store = LocalStore(tmp_path / "out")
    return store, load_or_create_plan(store, [str(tmp_path / "in")], rows_per_unit, {"task": {"prompt": "p"}})


def _commit(store, plan, unit, started, finished, errors=0, kinds=None):
    stats = {"rows": unit.rows, "errors": errors, "error_kinds": kinds or {}, "started_at": started,
             "finished_at": finished, "owner": "w"}
    Sink(store, plan).commit(unit.id, pa.table({"id": list(range(unit.row_start, unit.row_stop))}), stats)


def test_status_counts_units_rows_errors_and_eta(tmp_path):
    store, plan = _plan(tmp_path)
    assert len(plan.units) == 10
    now = time.time()
    for i, u in enumerate(plan.units[:4]):  # four units of 10 rows, one every 10 s
        _commit(store, plan, u, now - 100 + 10 * i, now - 90 + 10 * i, errors=i, kinds={"corrupt": i} if i else {})
    _commit(store, plan, plan.units[4], "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:05+00:00")
    claims = Claims(store, default_owner(), plan.epoch, ttl_s=60)
    assert claims.try_claim(plan.units[5].id) and claims.try_claim(plan.units[6].id)
    assert claims.try_claim(plan.units[0].id)  # a leftover claim on a done unit is not "claimed"
    s = read_status(store, ttl_s=60)
    assert s["output"] == store.root and s["fingerprint"] == {"task": {"prompt": "p"}} and s["epoch"] == plan.epoch
    assert (s["units_total"], s["units_done"], s["units_claimed"], s["units_failed"], s["units_pending"]) == \
        (10, 5, 2, 0, 3)
    assert (s["rows_total"], s["rows_done"], s["rows_errored"]) == (100, 50, 6)
    assert s["error_kinds"] == {"corrupt": 6} and s["state"] == "running"
    assert s["rate_rows_per_s"] > 0 and s["eta_s"] == pytest.approx(50 / s["rate_rows_per_s"])


def test_rate_uses_the_last_ten_minutes(tmp_path):
    store, plan = _plan(tmp_path, rows=200)
    # an hour-long slow start (10 rows / 1000 s), then ten units in the last 100 s (100 rows / 100 s)
    _commit(store, plan, plan.units[0], 0.0, 1000.0)
    for i, u in enumerate(plan.units[1:11]):
        _commit(store, plan, u, 4000.0 + 10 * i, 4010.0 + 10 * i)
    assert Claims(store, default_owner(), plan.epoch).try_claim(plan.units[11].id)  # a worker is at it
    s = read_status(store)
    assert s["rate_rows_per_s"] == pytest.approx(100 / 100)
    assert s["eta_s"] == pytest.approx(90 / s["rate_rows_per_s"])


def test_stopped_run_keeps_its_rate_but_has_no_eta(tmp_path, po_batch_cli):
    """Nothing holds a live claim and the last commit is long past: no worker is running, so no ETA."""
    store, plan = _plan(tmp_path, rows=40)
    for i, u in enumerate(plan.units[:2]):
        _commit(store, plan, u, 1000.0 + 10 * i, 1010.0 + 10 * i)
    s = read_status(store)
    assert (s["state"], s["eta_s"], s["rate_rows_per_s"]) == ("stopped", None, 1.0)
    res = po_batch_cli("status", store.root, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "state    stopped" in res.stdout and "eta none (stopped)" in res.stdout


def test_fresh_plan_has_unknown_rate_and_finished_plan_zero_eta(tmp_path):
    store, plan = _plan(tmp_path, rows=20)
    s = read_status(store)
    assert (s["units_pending"], s["rows_done"], s["rate_rows_per_s"], s["eta_s"]) == (2, 0, None, None)
    for u in plan.units:
        _commit(store, plan, u, 0.0, 5.0)
    s = read_status(store)
    assert (s["units_done"], s["eta_s"], s["rate_rows_per_s"], s["state"]) == (2, 0.0, 4.0, "done")


def test_status_of_a_directory_without_plan_is_a_clear_error(tmp_path):
    with pytest.raises(PlanError, match=f"no po-batch output at {tmp_path}"):
        read_status(LocalStore(tmp_path))


def test_empty_or_corrupt_marker_is_not_done_and_is_reported(tmp_path, po_batch_cli):
    store, plan = _plan(tmp_path, rows=30)
    _commit(store, plan, plan.units[0], 0.0, 5.0)
    done = tmp_path / "out" / "_po_batch" / "done"
    for u, content in zip(plan.units[1:], ["", '{"unit": "f0'], strict=True):
        (done / f"{u.id}.json").write_text(content)  # a marker cut short, as a crash on a careless filesystem does
        pq.write_table(pa.table({"id": [0]}), tmp_path / "out" / f"part-{u.id}.parquet")
    s = read_status(store)
    assert (s["units_done"], s["units_pending"]) == (1, 2)
    assert s["markers_unreadable"] == [u.id for u in plan.units[1:]]
    assert not Sink(store, plan).is_done(plan.units[1].id)
    res = po_batch_cli("status", store.root, timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"markers  2 unreadable markers ({plan.units[1].id}, {plan.units[2].id}): not done" in res.stdout


CLAIM_AND_EXIT = ("import sys; from po_batch.data.claims import Claims, default_owner; "
                  "from po_batch.data.store import LocalStore; "
                  "assert Claims(LocalStore(sys.argv[1]), default_owner(), sys.argv[2]).try_claim(sys.argv[3])")


def test_claims_of_dead_workers_and_expired_claims_are_not_shown_as_claimed(tmp_path, po_batch_cli):
    store, plan = _plan(tmp_path, rows=50)
    u = [x.id for x in plan.units]
    subprocess.run([sys.executable, "-c", CLAIM_AND_EXIT, store.root, plan.epoch, u[0]], check=True)  # SIGKILLed
    claims = Claims(store, default_owner(), plan.epoch, ttl_s=60)
    assert claims.try_claim(u[1]) and claims.try_claim(u[2])
    old = time.time() - 400  # past the ttl of the config (60 s) and the default of status without one (300 s)
    os.utime(tmp_path / "out" / "_po_batch" / "claims" / f"{u[2]}.claim", (old, old))  # a suspended worker's
    Sink(store, plan).mark_failed(u[3], "cannot read unit: OSError: Corrupt snappy compressed data.", "w")
    s = read_status(store, ttl_s=60)
    assert (s["units_claimed"], s["claims_dead"], s["claims_expired"], s["units_failed"], s["units_pending"]) == \
        (1, 1, 1, 1, 3)
    assert s["failed"] == {u[3]: "cannot read unit: OSError: Corrupt snappy compressed data."}
    res = po_batch_cli("status", store.root, "--json", timeout=60)
    assert json.loads(res.stdout)["claims_dead"] == 1
    res = po_batch_cli("status", store.root, timeout=60)
    assert "1 claimed, 1 failed, 3 pending (1 dead claim, 1 expired claim)" in res.stdout, res.stdout
    assert f"failed   {u[3]}: cannot read unit: OSError: Corrupt snappy compressed data." in res.stdout


def test_torn_or_garbled_lines_of_the_done_index_are_tolerated(tmp_path):
    store, plan = _plan(tmp_path, rows=50)
    for i, u in enumerate(plan.units[:3]):
        _commit(store, plan, u, 0.0, 5.0 + i, errors=1, kinds={"empty": 1})
    index = tmp_path / "out" / "_po_batch" / "done.idx"
    lines = index.read_bytes().splitlines(keepends=True)
    index.write_bytes(lines[0] + b"\x00garbage\tfrom\ta\tconcurrent\twriter\n" + lines[1] + lines[2][:-20])
    s = read_status(store)
    assert (s["units_done"], s["rows_errored"], s["error_kinds"]) == (3, 3, {"empty": 3})  # markers fill in
    _commit(store, plan, plan.units[3], 0.0, 9.0)  # its line lands on the torn one
    s = read_status(store)
    assert (s["units_done"], s["rows_done"], s["rows_errored"]) == (4, 40, 3)
    assert s["rate_rows_per_s"] == pytest.approx(40 / 9)


@pytest.mark.slow
def test_status_of_100k_units_takes_about_a_second(tmp_path):
    store, plan = _plan(tmp_path, rows=100_000, rows_per_unit=1, row_group_size=1000)
    assert len(plan.units) == 100_000
    out, done = tmp_path / "out", tmp_path / "out" / "_po_batch" / "done"
    done.mkdir()
    with open(out / "_po_batch" / "done.idx", "wb") as index:
        for i, u in enumerate(plan.units):
            doc = {"unit": u.id, "epoch": plan.epoch, "rows": 1, "errors": i % 2, "error_kinds": {"empty": i % 2},
                   "started_at": 1e9 + i, "finished_at": 1e9 + i + 1, "owner": "host:1:boot:ns:abcd"}
            (done / f"{u.id}.json").write_text(json.dumps(doc))  # what write_marker writes, without its fsyncs
            index.write(index_line(doc))
            (out / f"part-{u.id}.parquet").touch()
    # 100 markers that the index does not cover (their lines were lost): status reads these markers
    lines = (out / "_po_batch" / "done.idx").read_bytes().splitlines(keepends=True)
    (out / "_po_batch" / "done.idx").write_bytes(b"".join(lines[:-100]))
    read_status(store)  # warm
    wall, cpu = [], []
    for _ in range(5):
        w, c = time.perf_counter(), time.process_time()
        s = read_status(store)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    assert (s["units_done"], s["rows_errored"], s["error_kinds"]) == (100_000, 50_000, {"empty": 50_000})
    print(f"read_status over 100k units: best {min(wall):.3f} s wall, {min(cpu):.3f} s CPU")
    # CPU time: on a machine shared with other test runs wall time measures the neighbours; run alone, with the
    # files in the page cache, wall and CPU time are the same here (0.77 s on the 2-core dev VM); under a full
    # parallel suite the same CPU work measured 1.02 s, so the bound leaves room for a loaded machine
    assert min(cpu) < 1.5
