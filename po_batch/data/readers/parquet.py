"""Parquet inputs: units are row ranges cut from the metadata alone; a file's identity is its size, mtime and a hash
of its footer; a unit's rows are streamed a batch at a time, reading only the row groups they touch."""

import hashlib
import os
import posixpath
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from po_batch.data.errors import PlanError
from po_batch.data.readers.base import Batch, Reader, Unit, UnitReadError
from po_batch.data.schema import Columns
from po_batch.data.store import mtime


class ParquetReader(Reader):
    extensions = (".parquet",)

    def __init__(self, columns: Columns | None = None):
        self.columns = columns

    def describe(self, file: str, rows_per_unit: int) -> tuple[dict, pa.Schema]:
        ident, sizes, schema = read_identity(file)
        # a file's units are contiguous: their boundaries are the plan's smallest form (plan.json is read by every
        # status and every worker, at 100k units too)
        cuts = [a for a, _ in ranges(sizes, rows_per_unit)] + [ident["rows"]] if ident["rows"] else []
        return {"path": file, **ident, "cuts": cuts}, schema

    def changed(self, entry: dict) -> str | None:
        return changed(entry)

    def read(self, unit: Unit, entry: dict) -> Iterator[Batch]:
        cols = self.columns
        out = cols.output
        for batch in read_unit(unit, out + ([cols.image] if cols.image else [])):
            images = batch.column(cols.image).to_pylist() if cols.image else [None] * batch.num_rows
            images = [resolve_path(v, unit.file) if isinstance(v, str) else v for v in images]
            yield Batch(batch.select(out), images)


@contextmanager
def open_parquet(file: str) -> Iterator[pq.ParquetFile]:
    """A local path or an fsspec URL; OSError or ArrowException if it cannot be opened."""
    with ExitStack() as stack:
        src = stack.enter_context(fsspec.open(file, "rb")) if "://" in file else file
        yield stack.enter_context(pq.ParquetFile(src))


def ranges(sizes: list[int], rows_per_unit: int) -> list[tuple[int, int]]:
    """Row ranges of at most rows_per_unit rows from row-group sizes.

    Small row groups are grouped so a unit reads whole groups; a group of rows_per_unit rows or more
    is split into near-equal pieces, so no unit is a tiny tail.
    """
    out, start, pos = [], 0, 0
    for n in sizes:
        if n >= rows_per_unit or pos + n - start > rows_per_unit:
            if pos > start:
                out.append((start, pos))
            start = pos
        if n >= rows_per_unit:
            k = -(-n // rows_per_unit)
            out += [(pos + n * i // k, pos + n * (i + 1) // k) for i in range(k)]
            start = pos + n
        pos += n
    if pos > start:
        out.append((start, pos))
    return out


def cut_units(file: str, rows_per_unit: int) -> list[tuple[int, int]]:
    try:
        with open_parquet(file) as pf:
            return ranges(_group_sizes(pf), rows_per_unit)
    except (OSError, pa.ArrowException) as e:
        raise PlanError(f"cannot read Parquet file {file}: {e}") from e


def _group_sizes(pf: pq.ParquetFile) -> list[int]:
    return [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]


def read_identity(file: str) -> tuple[dict, list[int], pa.Schema]:
    """({size, mtime, footer, rows}, row-group sizes, Arrow schema) of a Parquet file; PlanError if unreadable.

    The footer hash is the cheap content check: any rewrite that keeps size and mtime still moves some offset,
    count or statistic in it."""
    fs, p = fsspec.core.url_to_fs(file)
    try:
        info = fs.info(p)
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            sizes, schema = _group_sizes(pf), pf.schema_arrow
            f.seek(info["size"] - 8)
            tail = f.read(8)  # the footer's length (little endian), then the magic
            n = int.from_bytes(tail[:4], "little")
            f.seek(info["size"] - 8 - n)
            footer = hashlib.sha256(f.read(n) + tail).hexdigest()[:16]
    except (OSError, pa.ArrowException) as e:
        raise PlanError(f"cannot read Parquet file {file}: {e}") from e
    return {"size": info["size"], "mtime": mtime(info), "footer": footer, "rows": sum(sizes)}, sizes, schema


def changed(entry: dict) -> str | None:
    """How a planned file differs from the file now, or None if it does not. Size and mtime alike is trusted
    without opening the file."""
    fs, p = fsspec.core.url_to_fs(entry["path"])
    try:
        info = fs.info(p)
    except FileNotFoundError:
        return "it is gone"
    if info["size"] == entry["size"] and mtime(info) == entry["mtime"]:
        return None
    try:
        now, _, _ = read_identity(entry["path"])
    except PlanError as e:
        return f"it can no longer be read: {e}"
    what = [f"{k} {entry[k]} -> {now[k]}" for k in ("size", "rows") if now[k] != entry[k]]
    if not what and now["footer"] != entry["footer"]:
        what = ["its Parquet footer differs"]
    return ", ".join(what) or None


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


def check_unique_ids(ids: list, unit: Unit, id_column: str, seen: set | None = None) -> None:
    """PlanError naming the first id that repeats; `seen` carries the unit's earlier ids (and takes these)."""
    seen = set() if seen is None else seen
    for v in ids:
        if v in seen:
            raise PlanError(
                f"{unit.file}: unit {unit.id} (rows {unit.row_start}-{unit.row_stop}) repeats {id_column} {v!r}; "
                "ids must be unique"
            )
        seen.add(v)
