"""Progress of an output directory from its files alone: the plan, the claims, the done index and markers."""

import time

from po_batch.data.claims import claim_states
from po_batch.data.errors import PlanError
from po_batch.data.markers import scan
from po_batch.data.planfile import read_plan_doc
from po_batch.data.store import Store

RATE_WINDOW_S = 600.0
RATE_MIN_UNITS = 5
# A run with no live claim that committed within this long is still running (between two units)
RECENT_S = 60.0


def _rate(sizes: list[int], started: list[float], finished: list[float]) -> float | None:
    """Rows per second over the last 10 minutes of finished units, or over the whole run when those are few."""
    if not finished:
        return None
    last = max(finished)
    edge = last - RATE_WINDOW_S
    window = [i for i, f in enumerate(finished) if f >= edge]
    if len(window) >= RATE_MIN_UNITS:
        # from the window's first start, not its edge: a run resumed 2 minutes ago was not idle before
        t0, rows = max(min(started[i] for i in window), edge), sum(sizes[i] for i in window)
    else:
        t0, rows = min(started), sum(sizes)
    return rows / (last - t0) if last > t0 else None


def read_status(store: Store, ttl_s: float = 300.0) -> dict:
    """Counts from the files alone. Done, claimed and failed units are those of the plan's epoch: the plan only
    grows and its units keep their ids, so they need no matching against the plan's list of units."""
    doc = read_plan_doc(store)
    if doc is None:
        raise PlanError(f"no po-batch output at {store.root}")
    epoch, files = doc["epoch"], [f for f in doc["files"] if "error" not in f]
    units_total, rows_total = sum(max(len(f["cuts"]) - 1, 0) for f in files), sum(f["rows"] for f in files)
    ledger = scan(store, epoch)
    claims = {k: s for k, s in claim_states(store, epoch, ttl_s).items() if k not in ledger.done}
    claimed = {k for k, s in claims.items() if s == "live"}
    failed = {k: why for k, why in ledger.failed.items() if k not in claimed}
    unreadable = {f["path"]: f["error"] for f in doc["files"] if "error" in f}
    rate = _rate(ledger.sizes, ledger.started, ledger.finished)
    rows_left = rows_total - ledger.rows
    last = max(ledger.finished, default=None)
    if rows_left == 0 and not unreadable:
        state = "done"
    elif claimed or (last is not None and time.time() - last < RECENT_S):
        state = "running"
    else:
        state = "stopped"
    return {
        "output": store.root,
        "state": state,
        "units_total": units_total,
        "units_done": len(ledger.done),
        "units_claimed": len(claimed),
        "units_failed": len(failed),
        "units_pending": units_total - len(ledger.done) - len(claimed) - len(failed),
        "claims_dead": sum(s == "dead" for s in claims.values()),
        "claims_expired": sum(s == "expired" for s in claims.values()),
        "failed": failed,
        "markers_unreadable": ledger.unreadable,
        "markers_other_epoch": len(ledger.other_epoch),
        "inputs_unreadable": unreadable,
        "rows_total": rows_total,
        "rows_done": ledger.rows,
        "rows_errored": ledger.errors,
        "error_kinds": dict(ledger.error_kinds.most_common()),
        "rate_rows_per_s": rate,
        "eta_s": 0.0 if rows_left == 0 else (rows_left / rate if rate and state == "running" else None),
        "epoch": epoch,
        "fingerprint": doc["fingerprint"],
    }
