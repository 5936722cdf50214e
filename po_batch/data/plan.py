"""The plan of an output directory (OUT/_po_batch/plan.json): the input files, each with its identity and its work
units, the results fingerprint, the output schema and the epoch.

The plan only grows: units keep their ids across resumes, so their part files keep their names. A replaced plan
(--restart, or a changed config before anything was committed) gets a new epoch, and nothing that a worker of an
older epoch commits afterwards counts.
"""

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise

import pyarrow as pa

from po_batch.data.errors import PlanError
from po_batch.data.layout import DONE_DIR, LOCK, PLAN, STATE_DIR
from po_batch.data.planfile import PLAN_VERSION, read_plan_doc
from po_batch.data.readers.base import Reader, Unit
from po_batch.data.readers.listing import list_inputs
from po_batch.data.readers.parquet import ParquetReader
from po_batch.data.schema import Columns, check_columns, decode, encode, unify
from po_batch.data.store import Store

# also reached through this module: PlanError (the CLI), Unit, read_plan_doc
__all__ = ["PlanError", "Plan", "Unit", "load_or_create_plan", "read_plan_doc", "units_of"]


@dataclass
class Plan:
    units: list[Unit]
    fingerprint: dict
    epoch: str
    schema: pa.Schema | None  # of the output's id and passthrough columns; None when planned without Columns
    unreadable: dict[str, str]  # input file -> why it could not be planned; tried again at each load
    files: dict[str, dict]  # input file -> its plan entry, which its reader reads units with


def unit_id(file_index: int, row_start: int) -> str:
    return f"f{file_index:05d}-r{row_start:09d}"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


_UNSET = object()


def _show(v) -> str:
    s = "unset" if v is _UNSET else repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _check_fingerprint(root: str, old: dict, new: dict) -> None:
    old, new = _flat(old), _flat(new)
    changed_keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k, _UNSET) != new.get(k, _UNSET)]
    if changed_keys:
        what = ", ".join(f"{k} ({_show(old.get(k, _UNSET))} -> {_show(new.get(k, _UNSET))})" for k in changed_keys)
        raise PlanError(
            f"output {root} was planned with a different {what}; rerun with --restart to discard its results"
        )


def _wipe(store: Store) -> None:
    """Delete what po-batch wrote, and nothing else; plan.lock stays because we hold it. The plan goes first:
    from then on, workers of the old plan see that it is not theirs."""
    store.delete(PLAN)
    for name in store.names(""):
        if (name.startswith("part-") and name.endswith(".parquet")) or (
            name.startswith(".part-") and name.endswith(".tmp")
        ):
            store.delete(name)
    for name in store.names(STATE_DIR):
        if f"{STATE_DIR}/{name}" != LOCK:
            store.delete(f"{STATE_DIR}/{name}")


def _committed(store: Store) -> bool:
    return any(not n.startswith(".") for n in store.names(DONE_DIR))


def units_of(entry: dict, file_index: int | None = None) -> list[Unit]:
    """A file's units, from its plan entry's boundaries."""
    index = entry["index"] if file_index is None else file_index
    return [Unit(unit_id(index, a), entry["path"], a, b) for a, b in pairwise(entry["cuts"])]


def plan_from_doc(doc: dict) -> Plan:
    units = [u for f in doc["files"] for u in units_of(f)]
    unreadable = {f["path"]: f["error"] for f in doc["files"] if "error" in f}
    schema = decode(doc["schema"]) if doc["schema"] else None
    return Plan(units, doc["fingerprint"], doc["epoch"], schema, unreadable, {f["path"]: f for f in doc["files"]})


def _describe(reader: Reader, path: str, rows_per_unit: int) -> tuple[dict, pa.Schema | None]:
    """A file's plan entry and its schema; a file that cannot be read is planned with its error and no units,
    so that it does not hold up the others."""
    try:
        return reader.describe(path, rows_per_unit)
    except PlanError as e:
        return {"path": path, "error": str(e), "cuts": []}, None


def _map(fn, items: list) -> list:
    # metadata reads are I/O bound (object stores): overlap them
    with ThreadPoolExecutor(min(16, len(items) or 1)) as pool:
        return list(pool.map(fn, items))


def load_or_create_plan(store: Store, input_paths: list[str], rows_per_unit: int, fingerprint: dict,
                        restart: bool = False, columns: Columns | None = None, reader: Reader | None = None) -> Plan:
    """Create the plan, or load it and append input files that appeared since; safe between processes.

    Refuses (PlanError) a changed fingerprint once a unit is committed, a planned file that changed, and input
    columns that are missing or typed so that the output could not have one schema. rows_per_unit applies to
    files when they are first planned (plan.json keeps the first value); planned units never change. `reader`
    is the inputs' format (Parquet when None).
    """
    if rows_per_unit < 1:
        raise PlanError(f"rows_per_unit must be at least 1, got {rows_per_unit}")
    reader = reader or ParquetReader()
    fingerprint = json.loads(json.dumps(fingerprint))  # compare as it will read back (tuples -> lists)
    # list before locking: a thousand array tasks listing a bucket one after another would queue for minutes
    inputs = list_inputs(input_paths, exclude=store.root, extensions=reader.extensions)
    with store.lock(LOCK):
        doc = None if restart else read_plan_doc(store)
        if doc is not None and doc["fingerprint"] != fingerprint:
            if _committed(store):
                _check_fingerprint(store.root, doc["fingerprint"], fingerprint)
            doc = None  # nothing was committed under it: a plan does not lock the fingerprint until then
        if doc is None:
            if restart or store.exists(PLAN):
                _wipe(store)
            doc = {"version": PLAN_VERSION, "epoch": uuid.uuid4().hex, "fingerprint": fingerprint,
                   "rows_per_unit": rows_per_unit, "schema": None, "files": []}
            dirty = True
        else:
            dirty = False
        planned = {f["path"]: f for f in doc["files"]}
        todo = [p for p in inputs if p not in planned or "error" in planned[p]]
        fresh = set(todo)
        described = _map(lambda p: _describe(reader, p, doc["rows_per_unit"]), todo)
        if columns is not None:
            schemas = {p: s for p, (_, s) in zip(todo, described) if s is not None}
            for p, s in schemas.items():
                check_columns(p, s, columns)
            if schemas:
                doc["schema"] = encode(unify(decode(doc["schema"]) if doc["schema"] else None, schemas, columns))
        reader.link([f for f in doc["files"] if f["path"] not in fresh], [e for e, _ in described if "error" not in e])
        for path, (entry, _) in zip(todo, described):
            if path not in planned:
                doc["files"].append({"index": len(doc["files"]), **entry})
                dirty = True
            elif {"index": planned[path]["index"], **entry} != planned[path]:  # unreadable when planned
                entry = {"index": planned[path]["index"], **entry}
                planned[path].clear()
                planned[path].update(entry)
                dirty = True
        if dirty:
            store.put(PLAN, json.dumps(doc, separators=(",", ":")).encode())
    listed = set(inputs)
    known = [f for f in doc["files"] if f["path"] in listed and f["path"] not in fresh and "error" not in f]
    for f, what in zip(known, _map(reader.changed, known)):
        if what:
            raise PlanError(f"input {f['path']} changed after it was planned ({what}); put the planned file back, "
                            "or rerun with --restart to start over")
    return plan_from_doc(doc)
