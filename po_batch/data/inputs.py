"""Input Parquet files as the plan sees them: listing, cutting into row ranges from the metadata alone, and each
file's identity (size, mtime, a hash of its footer), so that a file that changed after planning is noticed."""

import hashlib
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from po_batch.data.errors import PlanError, backend_error
from po_batch.data.layout import STATE_DIR


@contextmanager
def open_parquet(file: str) -> Iterator[pq.ParquetFile]:
    """A local path or an fsspec URL; OSError or ArrowException if it cannot be opened."""
    with ExitStack() as stack:
        src = stack.enter_context(fsspec.open(file, "rb")) if "://" in file else file
        yield stack.enter_context(pq.ParquetFile(src))


def _hidden(rel: str) -> bool:
    # same convention as pyarrow.dataset: '_SUCCESS', '.tmp' files and '_po_batch/' are not data
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def list_inputs(paths: list[str], exclude: str | None = None) -> list[str]:
    """Files, directories (every *.parquet inside, recursively), globs and fsspec URLs; sorted, unique.

    Local files come back as absolute paths, remote ones as URLs with their protocol. Nothing under `exclude`
    (the output directory) and nothing in a po-batch state folder is listed, whatever the globs say.
    """
    found = set()
    for path in paths:
        try:
            fs, p = fsspec.core.url_to_fs(path)
        except (ImportError, ValueError) as e:
            raise backend_error("input", path, e) from None
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
        matches = [os.path.normpath(m) if local else fs.unstrip_protocol(m) for m in matches]
        matches = [m for m in matches if not _ours(m, exclude)]
        if not matches:
            raise PlanError(f"input {path} matches no file")
        found.update(matches)
    return sorted(found)


def _ours(file: str, out_dir: str | None) -> bool:
    if STATE_DIR in file.split("/"):
        return True
    return bool(out_dir) and "://" not in file and os.path.realpath(file).startswith(os.path.realpath(out_dir) + os.sep)


def _parquet_in(fs, folder: str) -> list[str]:
    return [f for f in fs.find(folder) if f.endswith(".parquet") and not _hidden(f[len(folder):])]


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


def _mtime(info: dict) -> float | None:
    v = info.get("mtime", info.get("LastModified", info.get("created")))
    return v.timestamp() if isinstance(v, datetime) else v


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
    return {"size": info["size"], "mtime": _mtime(info), "footer": footer, "rows": sum(sizes)}, sizes, schema


def changed(entry: dict) -> str | None:
    """How a planned file differs from the file now ('size 120 -> 180, rows 10 -> 15'), or None if it does not.
    Size and mtime alike is trusted without opening the file."""
    fs, p = fsspec.core.url_to_fs(entry["path"])
    try:
        info = fs.info(p)
    except FileNotFoundError:
        return "it is gone"
    if info["size"] == entry["size"] and _mtime(info) == entry["mtime"]:
        return None
    try:
        now, _, _ = read_identity(entry["path"])
    except PlanError as e:
        return f"it can no longer be read: {e}"
    what = [f"{k} {entry[k]} -> {now[k]}" for k in ("size", "rows") if now[k] != entry[k]]
    if not what and now["footer"] != entry["footer"]:
        what = ["its Parquet footer differs"]
    return ", ".join(what) or None
