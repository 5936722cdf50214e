"""One Parquet part per unit, committed atomically under a deterministic name, then the unit's done marker.

Readers of pyarrow.dataset.dataset(OUT) see only whole parts: temporary files start with '.' and state
lives in '_po_batch/', both of which pyarrow skips. A rerun of a unit replaces its part, so each row
appears once whatever crashed where.
"""

import json
import os
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from po_batch.data.plan import claims_dir, fsync_dir, state_dir, write_json_atomic

ORPHAN_AGE_S = 3600.0


def part_path(out_dir: str, unit_id: str) -> str:
    return os.path.join(out_dir, f"part-{unit_id}.parquet")


def _marker_dir(out_dir: str) -> str:
    return os.path.join(state_dir(out_dir), "done")


def _marker_path(out_dir: str, unit_id: str) -> str:
    return os.path.join(_marker_dir(out_dir), f"{unit_id}.json")


def commit_unit(out_dir: str, unit_id: str, table: pa.Table, stats: dict) -> None:
    """Write the unit's part durably, then its done marker holding stats.

    stats: rows, errors, error_kinds {kind: count}, started_at and finished_at (epoch seconds), owner.
    """
    tmp = os.path.join(out_dir, f".part-{unit_id}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        pq.write_table(table, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, part_path(out_dir, unit_id))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(out_dir)  # the rename must be on disk before the marker claims it
    write_json_atomic(_marker_path(out_dir, unit_id), {"unit": unit_id, **stats})


def is_done(out_dir: str, unit_id: str) -> bool:
    # a marker whose part was deleted by hand does not count: the unit gets redone
    return os.path.exists(_marker_path(out_dir, unit_id)) and os.path.exists(part_path(out_dir, unit_id))


def done_units(out_dir: str) -> dict[str, dict]:
    """unit_id -> marker contents, for units whose marker and part both exist."""
    try:
        names = os.listdir(_marker_dir(out_dir))
    except FileNotFoundError:
        return {}
    parts = {n for n in os.listdir(out_dir) if n.startswith("part-")}
    done = {}
    for name in names:
        unit_id = name.removesuffix(".json")
        if name.startswith(".") or f"part-{unit_id}.parquet" not in parts:
            continue
        with open(os.path.join(_marker_dir(out_dir), name)) as f:
            done[unit_id] = json.load(f)
    return done


def clean_orphans(out_dir: str) -> None:
    """Remove temporary files that crashed writers (and claim takeovers) left more than an hour ago.

    Parts without a marker stay: their data is whole (the rename is atomic), the unit's rerun
    replaces them, and deleting one could race a writer suspended between rename and marker
    (Slurm suspends jobs with SIGSTOP), leaving a marker with no part.
    """
    cutoff = time.time() - ORPHAN_AGE_S
    for folder, prefix, suffix in ((out_dir, ".part-", ".tmp"), (_marker_dir(out_dir), ".", ".tmp"),
                                   (claims_dir(out_dir), "", ".tomb")):
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for e in entries:
            if e.name.startswith(prefix) and e.name.endswith(suffix):
                try:
                    if e.stat().st_mtime < cutoff:
                        os.remove(e.path)
                except FileNotFoundError:
                    pass
