"""End-to-end benchmark: Parquet of 448x448 JPEGs -> `po-batch run` (prep pool on all cores) -> Parquet, against
the engine-only rate of the same checkpoint in the same run. Writes JSON.

    python scripts/bench_e2e.py [--rows 8192]
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    import benchlib
    from bench_engine import VL_PROMPT
    from po_batch import worker
    from po_batch.config import config_from_dict
    from po_batch.data.markers import scan
    from po_batch.data.planfile import read_plan_doc
    from po_batch.data.store import open_store
    from po_batch.spec import open_spec

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--depths", default="2", help="QUEUE_DEPTH values to measure (batches queued on the device)")
    ap.add_argument("--busy", action="store_true", help="also trace device kernels in an extra run: busy fraction")
    ap.add_argument("--work", default="/tmp/po-batch-bench")
    ap.add_argument("--out", default=str(benchlib.ROOT / "bench" / "results" / "e2e.json"))
    args = ap.parse_args()
    work = Path(args.work)
    ckpt = benchlib.make_checkpoint("qwen3_vl_2b", work / "qwen3_vl_2b")
    data = work / "e2e-data"
    if not data.is_dir():
        data.mkdir(parents=True)
        jpegs = [benchlib.photo_jpeg(448, 448, i) for i in range(256)]
        per = args.rows // 4
        for f in range(4):
            ids = list(range(f * per, (f + 1) * per))
            pq.write_table(pa.table({"id": ids, "image": pa.array([jpegs[i % 256] for i in ids], pa.binary()),
                                     "category": ["dog"] * per}), data / f"part-{f}.parquet", row_group_size=512)
    cfg = config_from_dict({
        "model": {"path": str(ckpt)}, "input": {"paths": [str(data)], "columns": ["category"]},
        "task": {"prompt": VL_PROMPT},
        "output": {"path": str(work / "e2e-out")}, "run": {"rows_per_unit": 1024, "log_every_s": 10}})
    cores = len(os.sched_getaffinity(0))

    # engine only: the same rows, prepared up front
    spec = open_spec(cfg, "cuda", "bfloat16", workers=0)
    engine, prep = spec.load_engine(), spec.prep
    rows = [(benchlib.photo_jpeg(448, 448, i), {"id": i, "category": "dog"}) for i in range(64)]
    samples = [prep(rows[i % 64]) for i in range(1024)]
    t = time.perf_counter()
    for r in rows:
        prep(r)
    prep_ms = (time.perf_counter() - t) / len(rows) * 1000
    engine.score(samples[:128])
    torch.cuda.synchronize()
    t = time.perf_counter()
    handle = engine.launch(samples)
    engine_launch_s = time.perf_counter() - t
    handle.result()
    engine_rate = len(samples) / (time.perf_counter() - t)
    del spec, engine
    torch.cuda.empty_cache()

    runs = {}
    for depth in map(int, args.depths.split(",")):
        worker.QUEUE_DEPTH = depth
        t = time.perf_counter()
        stats = worker.RunStats()
        code = worker.run(cfg, restart=True, stats=stats)
        wall = time.perf_counter() - t
        store = open_store(cfg.output.path)
        ledger = scan(store, read_plan_doc(store)["epoch"])
        spans = sorted(zip(ledger.started, ledger.finished, ledger.sizes), key=lambda s: s[1])
        # steady state: rows committed after the first unit, over the time since the first unit committed
        steady = sum(n for _, _, n in spans[1:]) / (spans[-1][1] - spans[0][1])
        runs[depth] = {"exit_code": code, "e2e_wall_s": wall, "e2e_rows_per_s_including_startup": args.rows / wall,
                       "e2e_rows_per_s_steady": steady, "e2e_over_engine": steady / engine_rate,
                       "scoring_thread": {"wait_prep_s": stats.wait_prep_s, "launch_s": stats.launch_s,
                                          "wait_device_s": stats.wait_device_s}}
    record = {"env": benchlib.environment(), "cores": cores, "rows": args.rows,
              "prep_ms_per_image_one_core": prep_ms, "engine_only_rows_per_s": engine_rate,
              "engine_only_launch_s_per_1024": engine_launch_s, "by_queue_depth": runs}
    if args.busy:
        record["device_busy"] = device_busy(lambda: worker.run(cfg, restart=True))
    benchlib.write_json(Path(args.out), record)
    print(json.dumps(record, indent=1))
    print(f"\n{'depth':>6}{'engine-only/s':>14}{'e2e steady/s':>14}{'ratio':>8}{'e2e incl. start/s':>19}{'prep ms/img':>12}")
    for depth, r in runs.items():
        print(f"{depth:>6}{engine_rate:>14.1f}{r['e2e_rows_per_s_steady']:>14.1f}{r['e2e_over_engine']:>8.2f}"
              f"{r['e2e_rows_per_s_including_startup']:>19.1f}{prep_ms:>12.2f}")

def device_busy(fn) -> dict:
    """Trace device kernels over a whole run: the share of wall time between the first and last kernel in which
    some kernel runs, and the longest idle gaps (where the device waited for the host)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    busy, gaps, end = 0.0, [], spans[0][0]
    for a, b in spans:
        if a > end:
            gaps.append(a - end)
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    wall = end - spans[0][0]
    gaps.sort(reverse=True)
    return {"busy_fraction": busy / wall, "wall_s": wall / 1e6, "idle_s": (wall - busy) / 1e6,
            "gaps_over_1ms": sum(g > 1e3 for g in gaps), "idle_in_gaps_over_1ms_s": sum(g for g in gaps if g > 1e3) / 1e6,
            "longest_gaps_ms": [g / 1e3 for g in gaps[:10]]}


if __name__ == "__main__":
    main()
