"""Reading finished outputs back: the top K rows per group by a score column (`po-batch topk`), and for each query
embedding the K nearest rows of an embedding output by cosine (`po-batch nearest`). Both stream the outputs' parts
a batch at a time: memory holds the running results (groups x K rows, a chunk of queries x K), never an output."""

import os
import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq


class RetrieveError(Exception):
    """A user-facing problem with an output or an option, in one line."""


ORDER = "__po_batch_order"  # each row's place in the output (part by name, then row): ties go to the earlier row


def parts(output: str) -> list[str]:
    """The output's committed parts in name order (pyarrow skips temporary '.' files and the '_po_batch' state)."""
    if not os.path.isdir(output):
        raise RetrieveError(f"{output}: no such output directory")
    files = sorted(ds.dataset(output, format="parquet").files)
    if not files:
        raise RetrieveError(f"{output}: no committed parts (has `po-batch run` finished a unit?)")
    return files


def batches(output: str, columns: list[str] | None, rows: int) -> Iterator[pa.RecordBatch]:
    for f in parts(output):
        pf = pq.ParquetFile(f)
        missing = [c for c in columns or [] if c not in pf.schema_arrow.names]
        if missing:
            raise RetrieveError(f"{f}: no column {missing[0]!r} (it has: {', '.join(pf.schema_arrow.names)})")
        yield from pf.iter_batches(batch_size=rows, columns=columns)


def write(table: pa.Table, out: str) -> None:
    """Atomically: readers of `out` see the old file or the whole new one."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --- topk ------------------------------------------------------------------------------------------------------

def topk(output: str, by: str, k: int, out: str, group: str | None = None, ascending: bool = False,
         batch_rows: int = 65536) -> int:
    """The best `k` rows per value of `group` (or overall) by `by`, highest first (lowest with `ascending`); rows
    where `by` is null (failed rows) never rank. Writes them, with a 1-based `rank`, sorted by group then rank, to
    `out` (Parquet); returns the rows written."""
    if k < 1:
        raise RetrieveError(f"--k: must be at least 1 (got {k})")
    keep, seen = None, 0
    for batch in batches(output, None, batch_rows):
        for c in [by] + ([group] if group else []):
            if c not in batch.schema.names:
                raise RetrieveError(f"{output}: no column {c!r} (it has: {', '.join(batch.schema.names)})")
        if not (pa.types.is_integer(batch.schema.field(by).type) or pa.types.is_floating(batch.schema.field(by).type)):
            raise RetrieveError(f"--by: {by!r} is not a number column ({batch.schema.field(by).type})")
        table = pa.Table.from_batches([batch]).append_column(ORDER, pa.array(np.arange(seen, seen + batch.num_rows)))
        seen += batch.num_rows
        table = table.filter(pc.is_valid(table[by]))
        keep = _best(table if keep is None else pa.concat_tables([keep, table]), by, group, k, ascending)
    if keep is None:
        return 0
    keep = keep.append_column("rank", pa.array(_ranks(keep, group), pa.int32()))
    order = ([(group, "ascending")] if group else []) + [("rank", "ascending")]
    keep = keep.sort_by(order).drop_columns([ORDER])
    write(keep, out)
    return keep.num_rows


def _codes(table: pa.Table, group: str | None) -> np.ndarray:
    if group is None:
        return np.zeros(table.num_rows, dtype=np.int64)
    codes = pc.dictionary_encode(table[group].combine_chunks(), null_encoding="encode").indices
    return codes.to_numpy(zero_copy_only=False)


def _best(table: pa.Table, by: str, group: str | None, k: int, ascending: bool) -> pa.Table:
    """The first k rows of each group in (value, order) order."""
    value = table[by].to_numpy().astype(np.float64)
    idx = np.lexsort((table[ORDER].to_numpy(), value if ascending else -value, _codes(table, group)))
    return table.take(idx[_ranks_sorted(_codes(table, group)[idx]) < k])


def _ranks_sorted(codes: np.ndarray) -> np.ndarray:
    """0-based place of each row within its run of equal codes."""
    if len(codes) == 0:
        return codes
    starts = np.r_[0, np.flatnonzero(codes[1:] != codes[:-1]) + 1]
    return np.arange(len(codes)) - np.repeat(starts, np.diff(np.r_[starts, len(codes)]))


def _ranks(table: pa.Table, group: str | None) -> np.ndarray:
    """1-based ranks of `_best`'s rows, which come grouped and in rank order."""
    return _ranks_sorted(_codes(table, group)) + 1


# --- nearest ---------------------------------------------------------------------------------------------------

def _vectors(batch: pa.RecordBatch, column: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows that have a vector, (n, D) float32 vectors) of an embedding column; failed rows have none."""
    col = batch.column(column)
    if not pa.types.is_fixed_size_list(col.type):
        raise RetrieveError(f"{where}: column {column!r} is not an embedding (a fixed_size_list), it is {col.type}")
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    flat = col.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
    return np.flatnonzero(valid), flat.astype(np.float32).reshape(-1, col.type.list_size)


def nearest(images: str, queries: str, k: int, out: str, column: str = "embedding", id_column: str = "id",
            query_id_column: str | None = None, chunk_rows: int = 65536, query_rows: int = 4096,
            device: str | None = None) -> int:
    """For each query vector of `queries`, the `k` rows of `images` with the highest cosine similarity, best first
    (ties to the earlier row): `query_<id>`, `rank` (1-based), the row's id and `score`. Image rows stream through
    in chunks against a block of queries on `device` (CUDA when there is one); returns the rows written."""
    import torch

    if k < 1:
        raise RetrieveError(f"--k: must be at least 1 (got {k})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    qid = query_id_column or id_column
    q_ids, q_vecs = [], []
    for batch in batches(queries, [qid, column], chunk_rows):
        rows, vecs = _vectors(batch, column, queries)
        q_ids += batch.column(qid).take(pa.array(rows)).to_pylist()
        q_vecs.append(vecs)
    q_all = np.concatenate(q_vecs) if q_vecs else np.zeros((0, 0), np.float32)
    best_s, best_i = [], []
    for start in range(0, len(q_all), query_rows):
        s, i = _nearest_block(torch.from_numpy(q_all[start:start + query_rows]).to(device), images, column, k,
                              chunk_rows)
        best_s.append(s)
        best_i.append(i)
    scores = np.concatenate(best_s) if best_s else np.zeros((0, 0), np.float32)
    index = np.concatenate(best_i) if best_i else np.zeros((0, 0), np.int64)
    found = _ids(images, id_column, np.unique(index), chunk_rows)
    n, kk = index.shape
    table = pa.table({f"query_{qid}": pa.array(np.repeat(np.array(q_ids, dtype=object), kk).tolist()),
                      "rank": pa.array(np.tile(np.arange(1, kk + 1, dtype=np.int32), n)),
                      id_column: pa.array([found[i] for i in index.reshape(-1)]),
                      "score": pa.array(scores.reshape(-1), pa.float32())})
    write(table, out)
    return table.num_rows


def _nearest_block(q, images: str, column: str, k: int, chunk_rows: int):
    """(Q, k') scores and global row indices of the best rows for one block of queries (k' = min(k, rows))."""
    import torch
    import torch.nn.functional as F

    q = F.normalize(q.float(), dim=1)
    best_s = torch.empty((len(q), 0), device=q.device)
    best_i = torch.empty((len(q), 0), dtype=torch.long, device=q.device)
    seen = 0
    for batch in batches(images, [column], chunk_rows):
        rows, vecs = _vectors(batch, column, images)
        if vecs.shape[1] != q.shape[1]:
            raise RetrieveError(f"{images}: its embeddings have {vecs.shape[1]} values, the queries' {q.shape[1]}")
        x = F.normalize(torch.from_numpy(vecs).to(q.device), dim=1)
        # best so far first, then this chunk's rows in order: a stable sort breaks ties by the earlier row
        s = torch.cat([best_s, q @ x.T], 1)
        i = torch.cat([best_i, torch.from_numpy(rows + seen).to(q.device).expand(len(q), -1)], 1)
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
        best_s, best_i = s.gather(1, order), i.gather(1, order)
        seen += batch.num_rows
    return best_s.cpu().numpy(), best_i.cpu().numpy()


def _ids(output: str, id_column: str, wanted: np.ndarray, chunk_rows: int) -> dict[int, object]:
    """The ids of the rows at `wanted` (sorted global row indices), in one more pass over the id column."""
    found, seen = {}, 0
    for batch in batches(output, [id_column], chunk_rows):
        lo, hi = np.searchsorted(wanted, [seen, seen + batch.num_rows])
        if hi > lo:
            ids = batch.column(id_column).take(pa.array(wanted[lo:hi] - seen)).to_pylist()
            found.update(zip(wanted[lo:hi].tolist(), ids))
        seen += batch.num_rows
    return found
