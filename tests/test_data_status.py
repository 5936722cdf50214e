"""Status: counts, errors, rate and ETA from the plan, claims and done markers."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from po_batch.data.claims import Claims
from po_batch.data.plan import PlanError, load_or_create_plan
from po_batch.data.sink import commit_unit
from po_batch.data.status import read_status


def _plan(tmp_path, rows=100, rows_per_unit=10):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": list(range(rows))}), tmp_path / "in" / "a.parquet", row_group_size=10)
    out = str(tmp_path / "out")
    return out, load_or_create_plan(out, [str(tmp_path / "in")], rows_per_unit, {"task": {"prompt": "p"}})


def _commit(out, unit, started, finished, errors=0, kinds=None):
    stats = {"rows": unit.rows, "errors": errors, "error_kinds": kinds or {}, "started_at": started,
             "finished_at": finished, "owner": "w"}
    commit_unit(out, unit.id, pa.table({"id": list(range(unit.row_start, unit.row_stop))}), stats)


def test_status_counts_units_rows_errors_and_eta(tmp_path):
    out, plan = _plan(tmp_path)
    assert len(plan.units) == 10
    for i, u in enumerate(plan.units[:4]):  # four units of 10 rows, one every 10 s
        _commit(out, u, 1000.0 + 10 * i, 1010.0 + 10 * i, errors=i, kinds={"corrupt": i} if i else {})
    _commit(out, plan.units[4], "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:05+00:00")
    claims = Claims(out, "w", ttl_s=60)
    assert claims.try_claim(plan.units[5].id) and claims.try_claim(plan.units[6].id)
    assert claims.try_claim(plan.units[0].id)  # a leftover claim on a done unit is not "claimed"
    s = read_status(out, ttl_s=60)
    assert s["output"] == out and s["fingerprint"] == {"task": {"prompt": "p"}}
    assert (s["units_total"], s["units_done"], s["units_claimed"], s["units_pending"]) == (10, 5, 2, 3)
    assert (s["rows_total"], s["rows_done"], s["rows_errored"]) == (100, 50, 6)
    assert s["error_kinds"] == {"corrupt": 6}
    assert s["rate_rows_per_s"] > 0 and s["eta_s"] == pytest.approx(50 / s["rate_rows_per_s"])


def test_rate_uses_the_last_ten_minutes(tmp_path):
    out, plan = _plan(tmp_path, rows=200)
    # an hour-long slow start (10 rows / 1000 s), then ten units in the last 100 s (100 rows / 100 s)
    _commit(out, plan.units[0], 0.0, 1000.0)
    for i, u in enumerate(plan.units[1:11]):
        _commit(out, u, 4000.0 + 10 * i, 4010.0 + 10 * i)
    s = read_status(out)
    assert s["rate_rows_per_s"] == pytest.approx(100 / 100)
    assert s["eta_s"] == pytest.approx(90 / s["rate_rows_per_s"])


def test_fresh_plan_has_unknown_rate_and_finished_plan_zero_eta(tmp_path):
    out, plan = _plan(tmp_path, rows=20)
    s = read_status(out)
    assert (s["units_pending"], s["rows_done"], s["rate_rows_per_s"], s["eta_s"]) == (2, 0, None, None)
    for u in plan.units:
        _commit(out, u, 0.0, 5.0)
    s = read_status(out)
    assert (s["units_done"], s["eta_s"], s["rate_rows_per_s"]) == (2, 0.0, 4.0)


def test_status_of_a_directory_without_plan_is_a_clear_error(tmp_path):
    with pytest.raises(PlanError, match=f"no po-batch output at {tmp_path}"):
        read_status(str(tmp_path))
