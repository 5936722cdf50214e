"""Stream the rows of one unit from its Parquet file, a batch at a time; never a whole file."""

import os
import posixpath
from collections.abc import Iterator

import pyarrow as pa

from po_batch.data.errors import PlanError
from po_batch.data.inputs import open_parquet
from po_batch.data.plan import Unit


class UnitReadError(Exception):
    """The unit's rows cannot be read (a corrupt page, a truncated or vanished file): the unit fails, the others
    go on. str() is one line naming the file and the unit."""

    def __init__(self, unit: Unit, reason: str):
        super().__init__(f"cannot read unit {unit.id} (rows {unit.row_start}-{unit.row_stop} of {unit.file}): "
                         f"{reason}")
        self.unit, self.reason = unit, reason


def read_unit(unit: Unit, columns: list[str], batch_rows: int = 256) -> Iterator[pa.RecordBatch]:
    """Batches holding exactly rows [row_start, row_stop) of the unit's file, reading only the row groups they touch.

    Raises UnitReadError when the file cannot be read, and PlanError when it no longer fits the plan (a column
    is missing, rows are missing)."""
    try:
        yield from _read(unit, columns, batch_rows)
    except (OSError, pa.ArrowException) as e:
        raise UnitReadError(unit, f"{type(e).__name__}: {e}") from e


def _read(unit: Unit, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    with open_parquet(unit.file) as pf:
        names = pf.schema_arrow.names
        for c in columns:
            if c not in names:
                raise PlanError(f"column '{c}' not found in {unit.file} (it has: {', '.join(names)})")
        meta = pf.metadata
        if unit.row_stop > meta.num_rows:
            raise PlanError(
                f"{unit.file} has {meta.num_rows} rows but unit {unit.id} reads up to row {unit.row_stop}; "
                "the file changed after it was planned"
            )
        groups, first, pos = [], 0, 0
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            if pos < unit.row_stop and pos + n > unit.row_start:
                if not groups:
                    first = pos
                groups.append(i)
            pos += n
        if not groups:
            return
        pos = first
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
            lo, hi = max(unit.row_start - pos, 0), min(unit.row_stop - pos, batch.num_rows)
            if hi > lo:
                yield batch.slice(lo, hi - lo)
            pos += batch.num_rows
            if pos >= unit.row_stop:
                break


def resolve_path(value: str, parquet_file: str) -> str:
    """Absolute paths and URLs stay; a relative path is relative to the Parquet file's folder."""
    if "://" in value or os.path.isabs(value):
        return value
    if "://" in parquet_file:
        proto, rest = parquet_file.split("://", 1)
        # normpath on the part after '://' so the protocol's slashes survive
        return f"{proto}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), value))}"
    return os.path.normpath(os.path.join(os.path.dirname(parquet_file), value))


def check_unique_ids(ids: list, unit: Unit, id_column: str) -> None:
    seen = set()
    for v in ids:
        if v in seen:
            raise PlanError(
                f"{unit.file}: unit {unit.id} (rows {unit.row_start}-{unit.row_stop}) repeats {id_column} {v!r}; "
                "ids must be unique"
            )
        seen.add(v)
