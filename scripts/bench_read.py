"""Reading cost per row: the same 448x448 JPEGs (and a caption each) as a local WebDataset shard and as a local Parquet
file, read through po-batch's readers and unpacked into (image, fields) as the worker does, on one core.

    python scripts/bench_read.py [--rows 1024] [--repeats 7]

Prints a table last and writes bench/results/read-<date>-<host>.json.
"""

import argparse
import io
import json
import platform
import socket
import statistics
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchlib import photo_jpeg
from po_batch.data.plan import units_of
from po_batch.data.readers.parquet import ParquetReader
from po_batch.data.readers.wds import WdsReader
from po_batch.data.schema import Columns


def write_inputs(folder: Path, n: int) -> tuple[Path, Path, int]:
    images = [photo_jpeg(448, 448, seed=i) for i in range(n)]
    keys = [f"{i:09d}" for i in range(n)]
    captions = [f"caption of sample {i}" for i in range(n)]
    parquet = folder / "rows.parquet"
    pq.write_table(pa.table({"id": keys, "image": pa.array(images, pa.binary()), "caption": captions}), parquet,
                   row_group_size=256)
    shard = folder / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, image, caption in zip(keys, images, captions):
            for name, data in ((f"{key}.jpg", image), (f"{key}.json", json.dumps({"caption": caption}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return parquet, shard, sum(map(len, images))


def read_all(reader, file: str, entry: dict) -> int:
    """Rows read, unpacked as the worker's rows() does: ids, the fields of each row, its image."""
    n = 0
    for unit in units_of(entry, 0):
        for batch in reader.read(unit, entry):
            fields = {c: batch.table.column(c).to_pylist() for c in batch.table.column_names}
            for j, image in enumerate(batch.images):
                row = (image, {c: v[j] for c, v in fields.items()})
                n += len(row[0]) > 0
    return n


def library_iteration(file: str) -> int:
    """webdataset's own tar_file_iterator over the shard, members only (no samples, no fields): what reading with
    it would cost at the least -- why the reader walks an uncompressed shard itself."""
    from webdataset.tariterators import tar_file_iterator

    with open(file, "rb") as f:
        return sum(1 for _ in tar_file_iterator(f)) // 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    readers = {"parquet": ParquetReader(Columns("id", "image", ("caption",))), "webdataset": WdsReader(("caption",))}
    with tempfile.TemporaryDirectory() as tmp:
        parquet, shard, image_bytes = write_inputs(Path(tmp), args.rows)
        files = {"parquet": parquet, "webdataset": shard}
        times = {k: {"cpu": [], "wall": [], "plan": []} for k in readers}
        library = []
        entries = {k: readers[k].describe(str(files[k]), 4096)[0] for k in readers}
        for k in readers:  # warm up: the page cache, lazy imports
            assert read_all(readers[k], str(files[k]), entries[k]) == args.rows
        for _ in range(args.repeats):  # interleaved, so that load from elsewhere hits both alike
            for k, reader in readers.items():
                c = time.process_time()
                reader.describe(str(files[k]), 4096)  # once per file and plan, not per read
                times[k]["plan"].append((time.process_time() - c) * 1e3 / args.rows)
                c, w = time.process_time(), time.perf_counter()
                read_all(reader, str(files[k]), entries[k])
                times[k]["cpu"].append((time.process_time() - c) * 1e3 / args.rows)
                times[k]["wall"].append((time.perf_counter() - w) * 1e3 / args.rows)
            c = time.process_time()
            library_iteration(str(shard))
            library.append((time.process_time() - c) * 1e3 / args.rows)
        sizes = {k: f.stat().st_size for k, f in files.items()}

    rows = [dict(format=k, file_bytes=sizes[k], cpu_ms_per_row=statistics.median(t["cpu"]),
                 cpu_ms_per_row_min=min(t["cpu"]), wall_ms_per_row=statistics.median(t["wall"]),
                 plan_cpu_ms_per_row=statistics.median(t["plan"]),
                 mb_per_s=sizes[k] / 1e6 / (statistics.median(t["wall"]) * args.rows / 1e3)) for k, t in times.items()]
    ratio = rows[1]["cpu_ms_per_row"] / rows[0]["cpu_ms_per_row"]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    now = datetime.now(timezone.utc)
    import webdataset

    result = dict(bench="read", date=now.isoformat(timespec="seconds"), host=socket.gethostname(), cpu=cpu,
                  rows=args.rows, repeats=args.repeats, image="448x448 JPEG q90", image_bytes=image_bytes,
                  versions=dict(python=platform.python_version(), pyarrow=pa.__version__,
                                webdataset=webdataset.__version__),
                  note="median per-row ms over the repeats, warm page cache, one process: the reader plus the "
                       "worker's unpacking into (image, fields); plan: describing the file (once per plan); "
                       "Parquet row groups of 256, one shard of .jpg + .json members; the library iteration: "
                       "webdataset's tar_file_iterator over the shard, members only",
                  webdataset_over_parquet_cpu=ratio, results=rows,
                  webdataset_library_iteration_cpu_ms_per_row=statistics.median(library))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"read-{now:%Y-%m-%d}-{socket.gethostname()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{cpu}; {args.rows} rows of 448x448 JPEG, {args.repeats} repeats; wrote {path}")
    print(f"{'format':>10} {'MB':>7} {'CPU ms/row':>10} {'wall ms/row':>11} {'MB/s':>7} {'plan CPU ms/row':>15}")
    for r in rows:
        print(f"{r['format']:>10} {r['file_bytes'] / 1e6:>7.1f} {r['cpu_ms_per_row']:>10.4f} "
              f"{r['wall_ms_per_row']:>11.4f} {r['mb_per_s']:>7.0f} {r['plan_cpu_ms_per_row']:>15.4f}")
    print(f"webdataset's tar_file_iterator alone: {statistics.median(library):.4f} CPU ms/row")
    print(f"webdataset / parquet CPU per row: {ratio:.2f}")


if __name__ == "__main__":
    main()
