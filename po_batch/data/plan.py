"""List the inputs, cut them into work units, and keep the plan and its fingerprint under OUT/_po_batch/.

The plan only ever grows: units keep their ids across resumes, so their part files keep their names.
"""

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

PLAN_VERSION = 1
STATE_DIR = "_po_batch"


class PlanError(Exception):
    """A problem with the inputs or the output directory; the message is one line for the user."""


@dataclass(frozen=True)
class Unit:
    id: str
    file: str
    row_start: int
    row_stop: int  # exclusive

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start


@dataclass
class Plan:
    units: list[Unit]
    fingerprint: dict


def unit_id(file_index: int, row_start: int) -> str:
    return f"f{file_index:05d}-r{row_start:09d}"


def state_dir(out_dir: str) -> str:
    return os.path.join(out_dir, STATE_DIR)


def claims_dir(out_dir: str) -> str:
    return os.path.join(state_dir(out_dir), "claims")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj) -> None:
    """Readers see the old file or the whole new one, even after a crash or power loss."""
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    # dot-prefixed so that listings of markers and pyarrow.dataset skip it
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(folder)


@contextmanager
def open_parquet(file: str) -> Iterator[pq.ParquetFile]:
    with ExitStack() as stack:
        try:
            src = stack.enter_context(fsspec.open(file, "rb")) if "://" in file else file
            pf = stack.enter_context(pq.ParquetFile(src))
        except (OSError, pa.ArrowException) as e:
            raise PlanError(f"cannot read Parquet file {file}: {e}") from e
        yield pf


def _hidden(rel: str) -> bool:
    # same convention as pyarrow.dataset: '_SUCCESS', '.tmp' files and '_po_batch/' are not data
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def list_inputs(paths: list[str]) -> list[str]:
    """Files, directories (every *.parquet inside, recursively), globs and fsspec URLs; sorted, unique.

    Local files come back as absolute paths, remote ones as URLs with their protocol.
    """
    found = set()
    for path in paths:
        fs, p = fsspec.core.url_to_fs(path)
        local = isinstance(fs, LocalFileSystem)
        if any(c in p for c in "*?["):
            matches = []
            for m in fs.glob(p):
                matches += _parquet_in(fs, m) if fs.isdir(m) else [m]
        elif fs.isdir(p):
            matches = _parquet_in(fs, p)
            if not matches:
                raise PlanError(f"input directory {path} holds no .parquet files")
        else:
            matches = [p] if fs.exists(p) else []
        if not matches:
            raise PlanError(f"input {path} matches no file")
        found.update(os.path.normpath(m) if local else fs.unstrip_protocol(m) for m in matches)
    return sorted(found)


def _parquet_in(fs, folder: str) -> list[str]:
    return [f for f in fs.find(folder) if f.endswith(".parquet") and not _hidden(f[len(folder):])]


def cut_units(file: str, rows_per_unit: int) -> list[tuple[int, int]]:
    """Row ranges of at most rows_per_unit rows from the row-group sizes alone.

    Small row groups are grouped so a unit reads whole groups; a group of rows_per_unit rows or more
    is split into near-equal pieces, so no unit is a tiny tail.
    """
    with open_parquet(file) as pf:
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    ranges, start, pos = [], 0, 0
    for n in sizes:
        if n >= rows_per_unit or pos + n - start > rows_per_unit:
            if pos > start:
                ranges.append((start, pos))
            start = pos
        if n >= rows_per_unit:
            k = -(-n // rows_per_unit)
            ranges += [(pos + n * i // k, pos + n * (i + 1) // k) for i in range(k)]
            start = pos + n
        pos += n
    if pos > start:
        ranges.append((start, pos))
    return ranges


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


def _check_fingerprint(out_dir: str, old: dict, new: dict) -> None:
    old, new = _flat(old), _flat(new)
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k, _UNSET) != new.get(k, _UNSET)]
    if changed:
        what = ", ".join(f"{k} ({_show(old.get(k, _UNSET))} -> {_show(new.get(k, _UNSET))})" for k in changed)
        raise PlanError(
            f"output {out_dir} was planned with a different {what}; rerun with --restart to discard its results"
        )


def _wipe(out_dir: str) -> None:
    """Delete what po-batch wrote, and nothing else; plan.lock stays because we hold it."""
    for name in os.listdir(out_dir):
        if (name.startswith("part-") and name.endswith(".parquet")) or (
            name.startswith(".part-") and name.endswith(".tmp")
        ):
            os.remove(os.path.join(out_dir, name))
    state = state_dir(out_dir)
    for name in os.listdir(state):
        path = os.path.join(state, name)
        if name == "plan.lock":
            continue
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def read_plan_doc(out_dir: str) -> dict | None:
    path = os.path.join(state_dir(out_dir), "plan.json")
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise PlanError(f"{path} is not valid JSON ({e}); rerun with --restart to start over") from e
    if doc.get("version") != PLAN_VERSION:
        raise PlanError(f"{path} has plan version {doc.get('version')}, this po-batch reads version {PLAN_VERSION}")
    return doc


def plan_from_doc(doc: dict) -> Plan:
    units = [Unit(unit_id(f["index"], a), f["path"], a, b) for f in doc["files"] for a, b in f["units"]]
    return Plan(units, doc["fingerprint"])


def load_or_create_plan(
    out_dir: str, input_paths: list[str], rows_per_unit: int, fingerprint: dict, restart: bool = False
) -> Plan:
    """Create the plan, or load it and append input files that appeared since; safe between processes.

    rows_per_unit applies to files when they are first planned (plan.json keeps the first value);
    planned units never change.
    """
    if "://" in out_dir and not out_dir.startswith("file://"):
        raise PlanError(f"output {out_dir} must be a local or shared-filesystem directory")
    out_dir = out_dir.removeprefix("file://")
    if rows_per_unit < 1:
        raise PlanError(f"rows_per_unit must be at least 1, got {rows_per_unit}")
    fingerprint = json.loads(json.dumps(fingerprint))  # compare as it will read back (tuples -> lists)
    # list before locking: a thousand array tasks listing a bucket one after another would queue for minutes
    inputs = list_inputs(input_paths)
    state = state_dir(out_dir)
    os.makedirs(state, exist_ok=True)
    with open(os.path.join(state, "plan.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if restart:
            _wipe(out_dir)
        doc = read_plan_doc(out_dir)
        if doc is None:
            doc = {"version": PLAN_VERSION, "fingerprint": fingerprint, "rows_per_unit": rows_per_unit, "files": []}
            created = True
        else:
            _check_fingerprint(out_dir, doc["fingerprint"], fingerprint)
            created = False
        known = {f["path"] for f in doc["files"]}
        new = [p for p in inputs if p not in known]
        # metadata reads are I/O bound (object stores): overlap them
        with ThreadPoolExecutor(min(16, len(new) or 1)) as pool:
            cuts = list(pool.map(lambda p: cut_units(p, rows_per_unit), new))
        for path, ranges in zip(new, cuts):
            rows = ranges[-1][1] if ranges else 0
            doc["files"].append({"index": len(doc["files"]), "path": path, "rows": rows, "units": ranges})
        if new or created:
            write_json_atomic(os.path.join(state, "plan.json"), doc)
    return plan_from_doc(doc)
