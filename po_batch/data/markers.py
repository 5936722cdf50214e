"""Which units of a plan epoch are done or failed: done markers, failure records and the done index.

A unit is done when its marker (_po_batch/done/{unit}.json) carries the plan's epoch and its part exists; a failure
record (_po_batch/failed/{unit}.json) is not done, and a commit removes it. Each commit also appends a line to
_po_batch/done.idx so that status reads one file instead of a marker per unit: markers stay the truth (a line
of another epoch, a torn or garbled line is skipped, and a marker that no line covers is read itself).
"""

import json
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from itertools import repeat
from operator import itemgetter

from po_batch.data.layout import DONE_DIR, FAILED_DIR, INDEX, failure_name, marker_name, part_name
from po_batch.data.store import Store


@dataclass
class Ledger:
    """What the markers of one epoch say, with the stats of the done units summed up (status reads 100k units in
    a fraction of a second this way; a dict per unit would take seconds)."""

    done: set[str] = field(default_factory=set)
    rows: int = 0  # of the done units, as their markers count them
    errors: int = 0
    error_kinds: Counter = field(default_factory=Counter)
    # per done unit, in one order: its rows, started_at and finished_at
    sizes: list[int] = field(default_factory=list)
    started: list[float] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # unit -> why, for failed units not done since
    unreadable: list[str] = field(default_factory=list)  # units whose marker does not parse: not done
    other_epoch: list[str] = field(default_factory=list)  # units committed under a replaced plan: not done


def timestamp(v: float | str) -> float:
    # epoch seconds; ISO 8601 strings are read too
    return datetime.fromisoformat(v).timestamp() if isinstance(v, str) else float(v)


def index_line(doc: dict) -> bytes:
    """One commit in the index: tab-separated fields, then a CRC-32 of them, so a torn or garbled line is known."""
    body = "\t".join([doc["unit"], doc["epoch"], str(doc["rows"]), str(doc["errors"]),
                      repr(timestamp(doc["started_at"])), repr(timestamp(doc["finished_at"])),
                      _kinds(doc["error_kinds"]).decode()]).encode()
    return body + b"\t%08x\n" % zlib.crc32(body)


def _read_index(store: Store, epoch: str) -> dict[str, tuple[bytes, ...]]:
    """unit -> the fields of its last whole line of the epoch: (line, unit, rows, errors, started_at, finished_at,
    error_kinds, crc), unparsed. One regular expression over the file and C-level maps: a Python loop per line
    would cost most of status's second at 100k units."""
    try:
        data = store.read(INDEX)
    except FileNotFoundError:
        return {}
    line = re.compile(rb"^((\S+)\t%s\t(\d+)\t(\d+)\t(\S+)\t(\S+)\t(\S+))\t([0-9a-f]{8})$" % re.escape(epoch.encode()),
                      re.MULTILINE)
    whole = [m for m in line.findall(data) if int(m[7], 16) == zlib.crc32(m[0])]  # not torn, not garbled
    return dict(zip(map(bytes.decode, map(itemgetter(1), whole)), whole))


def _kinds(error_kinds: dict) -> bytes:
    return json.dumps(error_kinds, separators=(",", ":")).encode()


def _add(ledger: Ledger, rows: list[int], errors: list[int], started: list[float], finished: list[float],
         kinds: list[bytes]) -> None:
    ledger.rows += sum(rows)
    ledger.errors += sum(errors)
    ledger.sizes += rows
    ledger.started += started
    ledger.finished += finished
    for k, n in Counter(kinds).items():  # a few distinct values over many units: parse each once
        for kind, count in json.loads(k).items():
            ledger.error_kinds[kind] += count * n


def write_marker(store: Store, unit_id: str, epoch: str, stats: dict) -> None:
    """Mark a unit whose part is written as done. stats: rows, errors, error_kinds {kind: count}, started_at and
    finished_at (epoch seconds), owner."""
    doc = {"unit": unit_id, "epoch": epoch, **stats}
    store.put(marker_name(unit_id), json.dumps(doc, separators=(",", ":")).encode())
    try:
        store.append(INDEX, index_line(doc))
    except OSError:  # the index only makes status fast; the marker above is what counts
        pass
    store.delete(failure_name(unit_id))


def mark_failed(store: Store, unit_id: str, epoch: str, reason: str, owner: str) -> None:
    """Record why a unit could not be done; it is not done, so a later run tries it again."""
    doc = {"unit": unit_id, "epoch": epoch, "reason": reason, "owner": owner, "failed_at": time.time()}
    store.put(failure_name(unit_id), json.dumps(doc, separators=(",", ":")).encode())


def _marker(store: Store, unit_id: str) -> dict | None:
    """The marker's contents; None if there is none; ValueError if it does not parse."""
    try:
        doc = json.loads(store.read(marker_name(unit_id)))
    except FileNotFoundError:
        return None
    if not isinstance(doc, dict):
        raise ValueError("not an object")
    return doc


def is_done(store: Store, unit_id: str, epoch: str) -> bool:
    try:
        doc = _marker(store, unit_id)
    except ValueError:
        return False
    # a marker whose part was deleted by hand does not count: the unit gets redone
    return doc is not None and doc.get("epoch") == epoch and store.exists(part_name(unit_id))


def scan(store: Store, epoch: str) -> Ledger:
    """Done, failed and unreadable units of the epoch, from the index plus the markers it does not cover."""
    ledger = Ledger()
    # Names that are not '{unit}.json' or 'part-{unit}.parquet' (temporaries, the state folder) stay as they are,
    # which no unit id is: the intersections drop them.
    markers = set(map(str.removesuffix, store.names(DONE_DIR), repeat(".json")))
    parts = set(map(str.removesuffix, map(str.removeprefix, store.names(""), repeat("part-")), repeat(".parquet")))
    present = markers & parts  # a marker whose part was deleted by hand does not count
    index = _read_index(store, epoch)
    ledger.done = index.keys() & present
    lines = list(index.values()) if len(ledger.done) == len(index) else [index[u] for u in ledger.done]
    rows, errors, started, finished, kinds = (list(map(itemgetter(i), lines)) for i in range(2, 7))
    _add(ledger, list(map(int, rows)), list(map(int, errors)), list(map(float, started)), list(map(float, finished)),
         kinds)
    # what the index does not cover is read: commits whose line was lost or torn, and markers of other epochs
    uncovered = sorted(u for u in present - ledger.done if not u.startswith("."))
    read = []
    for unit_id in uncovered:
        try:
            doc = _marker(store, unit_id)
        except ValueError:
            ledger.unreadable.append(unit_id)
            continue
        if doc is None:
            continue
        if doc.get("epoch") != epoch:
            ledger.other_epoch.append(unit_id)
            continue
        try:
            read.append([int(doc["rows"]), int(doc["errors"]), timestamp(doc["started_at"]),
                         timestamp(doc["finished_at"]), _kinds(doc["error_kinds"])])
        except (KeyError, TypeError, ValueError):
            ledger.unreadable.append(unit_id)
            continue
        ledger.done.add(unit_id)
    if read:
        _add(ledger, *map(list, zip(*read)))
    for name in store.names(FAILED_DIR):
        unit_id = name.removesuffix(".json")
        if name.startswith(".") or unit_id == name or unit_id in ledger.done:
            continue
        try:
            doc = json.loads(store.read(failure_name(unit_id)))
        except (FileNotFoundError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("epoch") == epoch:
            ledger.failed[unit_id] = doc.get("reason", "")
    return ledger
