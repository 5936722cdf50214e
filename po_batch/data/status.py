"""Progress of an output directory from its files alone: the plan, the claims, the done index and markers, and the
workers' progress records (which worker holds which claims, dead and expired ones included)."""

import time
from collections import Counter

from po_batch.data.claims import read_claims
from po_batch.data.errors import PlanError
from po_batch.data.markers import scan
from po_batch.data.planfile import read_plan_doc
from po_batch.data.store import Store
from po_batch.data.workers import read_records, record_state

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
    now = time.time()
    held = {k: c for k, c in read_claims(store, epoch, ttl_s).items() if k not in ledger.done}
    claims = {k: s for k, (s, _) in held.items()}
    claimed = {k for k, s in claims.items() if s == "live"}
    workers = _workers(read_records(store, epoch), held, ttl_s, now)
    failed = {k: why for k, why in ledger.failed.items() if k not in claimed}
    unreadable = {f["path"]: f["error"] for f in doc["files"] if "error" in f}
    rate = _rate(ledger.sizes, ledger.started, ledger.finished)
    rows_left = rows_total - ledger.rows
    last = max(ledger.finished, default=None)
    if rows_left == 0 and not unreadable:
        state = "done"
    elif claimed or (last is not None and now - last < RECENT_S) or any(w["state"] in ("starting", "running")
                                                                         for w in workers):
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
        "stale_claims": _stale(held, workers),
        "workers": workers,
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


WHERE = ("host", "pid", "slurm_job", "slurm_task", "gpu", "engine")


def _workers(records: list[dict], held: dict, ttl_s: float, now: float) -> list[dict]:
    """Each record as status shows it: where the worker runs, its state judged from here (workers.record_state),
    how far it got, and how many claims it holds by their state."""
    by_owner = {}
    for state, owner in held.values():
        by_owner.setdefault(owner, Counter())[state] += 1
    return [{**{k: r.get(k) for k in WHERE}, "owner": r["owner"], "state": record_state(r, ttl_s, now),
             "exit_code": r.get("exit_code"), "rows": r.get("rows", 0), "row_errors": r.get("row_errors", 0),
             "units": r.get("units", 0), "rows_per_s": r.get("rows_per_s"),
             "updated_at": r.get("updated_at"), "progress_at": r.get("progress_at"),
             "claims": dict(by_owner.get(r["owner"], {}))} for r in records]


def _stale(held: dict, workers: list[dict]) -> list[dict]:
    """The dead and expired claims by owner: the worker of each, where a record names it."""
    where = {w["owner"]: {k: w[k] for k in WHERE} | {"state": w["state"]} for w in workers}
    owners = {}
    for state, owner in held.values():
        if state != "live":
            owners.setdefault(owner, Counter())[state] += 1
    return [{"owner": owner, "worker": where.get(owner), **counts} for owner, counts in owners.items()]


def worker_name(w: dict) -> str:
    """host pid N [task T] [gpu G]: a worker as status and launchers name it."""
    parts = [str(w["host"]), f"pid {w['pid']}"]
    if w.get("slurm_task") is not None:
        parts.append(f"task {w['slurm_task']}")
    elif w.get("slurm_job") is not None:
        parts.append(f"job {w['slurm_job']}")
    if w.get("gpu") is not None:
        parts.append(f"gpu {w['gpu']}")
    elif w.get("engine") is not None:
        parts.append(f"engine {w['engine']}")
    return " ".join(parts)
