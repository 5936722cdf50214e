"""Each worker's progress record, OUT/_po_batch/workers/{host}-{pid}-{nonce}.json: where it runs (host, pid, the
labels its executor gave it: GPU, Slurm task), how far it got (rows, row errors, units, rate) and when it last said
so. A launcher sums its workers' records into one display for the node; status lists them. A record is rewritten
whole every few seconds and once more when its worker ends, with the state it ended in."""

import json
import time

from po_batch.data.claims import owner_dead
from po_batch.data.layout import WORKERS_DIR, record_name
from po_batch.data.store import Store

# states a worker writes: starting (loading the model), running, then done (exit 0, or 4: the rest is held by other
# workers), stopped (exit 3), failed (exit 1); a launcher writes died for a worker it saw die
ENDED = ("done", "stopped", "failed", "died")
# records not rewritten for this long are removed when a run starts: a running worker rewrites its own every few
# seconds, so these are ended or long dead ones (status would read them all, at every call)
KEEP_S = 3600.0


def write_record(store: Store, doc: dict) -> None:
    try:
        store.put(record_name(doc["owner"]), json.dumps(doc, separators=(",", ":")).encode())
    except OSError:  # a record only informs; a full disk is for the commits to report
        pass


def read_records(store: Store, epoch: str | None = None) -> list[dict]:
    """The records of the plan's `epoch` (all, if None), oldest worker first; unreadable ones (a torn write on a
    filesystem without atomic rename, a record deleted meanwhile) are skipped."""
    docs = []
    for name in store.names(WORKERS_DIR):
        if name.startswith(".") or not name.endswith(".json"):
            continue
        try:
            doc = json.loads(store.read(f"{WORKERS_DIR}/{name}"))
        except (FileNotFoundError, ValueError):
            continue
        if isinstance(doc, dict) and "owner" in doc and (epoch is None or doc.get("epoch") == epoch):
            docs.append(doc)
    return sorted(docs, key=lambda d: (d.get("started_at", 0), d["owner"]))


def record_state(doc: dict, ttl_s: float, now: float) -> str:
    """What a record says, judged from here: its own state, except that a worker which says it is running but whose
    process provably died is 'dead', and one that has not rewritten its record within ttl_s is 'silent' (hung,
    suspended, or on a host that went away: its claims expire as well)."""
    state = doc.get("state", "running")
    if state in ENDED:
        return state
    if owner_dead(doc["owner"]):
        return "dead"
    return "silent" if now - doc.get("updated_at", 0) > ttl_s else state


def prune_records(store: Store, epoch: str) -> None:
    """Remove the records of replaced plans, and those not rewritten for KEEP_S."""
    cutoff = time.time() - KEEP_S
    for doc in read_records(store):
        if doc.get("epoch") != epoch or doc.get("updated_at", 0) < cutoff:
            store.delete(record_name(doc["owner"]))
