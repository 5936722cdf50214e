"""Progress of an output directory from its files alone: the plan, the claims and the done markers."""

from collections import Counter
from datetime import datetime

from po_batch.data.claims import claimed_units
from po_batch.data.plan import PlanError, plan_from_doc, read_plan_doc
from po_batch.data.sink import done_units

RATE_WINDOW_S = 600.0
RATE_MIN_UNITS = 5


def _ts(v: float | str) -> float:
    # epoch seconds; ISO 8601 strings are read too
    return datetime.fromisoformat(v).timestamp() if isinstance(v, str) else float(v)


def _rate(markers: list[dict]) -> float | None:
    """Rows per second over the last 10 minutes of finished units, or over the whole run when those are few."""
    spans = [(_ts(m["started_at"]), _ts(m["finished_at"]), m["rows"]) for m in markers]
    if not spans:
        return None
    last = max(f for _, f, _ in spans)
    window = [(s, f, n) for s, f, n in spans if f >= last - RATE_WINDOW_S]
    if len(window) >= RATE_MIN_UNITS:
        # from the window's first start, not its edge: a run resumed 2 minutes ago was not idle before
        spans, t0 = window, max(min(s for s, _, _ in window), last - RATE_WINDOW_S)
    else:
        t0 = min(s for s, _, _ in spans)
    return sum(n for _, _, n in spans) / (last - t0) if last > t0 else None


def read_status(out_dir: str, ttl_s: float = 300.0) -> dict:
    doc = read_plan_doc(out_dir)
    if doc is None:
        raise PlanError(f"no po-batch output at {out_dir}")
    units = {u.id: u for u in plan_from_doc(doc).units}
    done = {k: m for k, m in done_units(out_dir).items() if k in units}
    claimed = (claimed_units(out_dir, ttl_s) & units.keys()) - done.keys()
    rows_total = sum(u.rows for u in units.values())
    rows_done = sum(units[k].rows for k in done)
    kinds = Counter()
    for m in done.values():
        kinds.update(m.get("error_kinds", {}))
    rate = _rate(list(done.values()))
    rows_left = rows_total - rows_done
    return {
        "output": out_dir,
        "units_total": len(units),
        "units_done": len(done),
        "units_claimed": len(claimed),
        "units_pending": len(units) - len(done) - len(claimed),
        "rows_total": rows_total,
        "rows_done": rows_done,
        "rows_errored": sum(m.get("errors", 0) for m in done.values()),
        "error_kinds": dict(kinds.most_common()),
        "rate_rows_per_s": rate,
        "eta_s": 0.0 if rows_left == 0 else (rows_left / rate if rate else None),
        "fingerprint": doc["fingerprint"],
    }
