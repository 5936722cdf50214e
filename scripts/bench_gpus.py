"""Every GPU of a node: `po-batch run` with `run.gpus: auto` over a Parquet corpus of 448x448 JPEGs (random-weight
Qwen3-VL-2B with the published shapes), against `gpus: 1` on the same machine in the same call. Reports rows/s in
steady state (while every engine process scores), the scaling over one GPU, each GPU's device-busy fraction
(nvidia-smi's utilization: the share of time some kernel ran) and the CPU cores used per GPU. Writes JSON.

    python scripts/bench_gpus.py [--rows 32768]      # on a 2- or 4-GPU machine
    python scripts/bench_gpus.py --cpu-smoke          # here: the tiny model, 1 vs 2 CPU engine processes
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

PROMPT = "Is there a {category} in this image? Answer yes or no."


def corpus(folder: Path, rows: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (folder / "rows").is_file() and int((folder / "rows").read_text()) == rows:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    jpegs = [benchlib.photo_jpeg(448, 448, i) for i in range(256)]
    per = rows // 8
    for f in range(8):
        ids = list(range(f * per, (f + 1) * per))
        pq.write_table(pa.table({"id": ids, "image": pa.array([jpegs[i % 256] for i in ids], pa.binary()),
                                 "category": ["dog"] * per}), folder / f"part-{f}.parquet", row_group_size=256)
    (folder / "rows").write_text(str(rows))
    return folder


class GpuSampler(threading.Thread):
    """nvidia-smi's per-GPU utilization every 100 ms: (time, {gpu index: percent})."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, dict[int, float]]] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.1):
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            self.samples.append((time.time(), {int(i): float(u) for i, u in
                                               (line.split(",") for line in out.strip().splitlines())}))

    def busy(self, t0: float, t1: float) -> dict[int, float]:
        inside = [s for t, s in self.samples if t0 <= t <= t1]
        return {g: sum(s[g] for s in inside) / len(inside) / 100 for g in inside[0]} if inside else {}


def markers(out: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in (out / "_po_batch" / "done").glob("*.json")]


def steady(docs: list[dict]) -> dict:
    """Rows/s while every engine process scores: the units committed after each one's first commit and before the
    first of them ran out of work, over that window."""
    by = {}
    for d in docs:
        by.setdefault(d["owner"], []).append(d)
    firsts = [min(x["finished_at"] for x in ds) for ds in by.values()]
    lasts = [max(x["finished_at"] for x in ds) for ds in by.values()]
    t0, t1 = max(firsts), min(lasts)
    rows = sum(d["rows"] for d in docs if t0 < d["finished_at"] <= t1)
    return {"engines_committing": len(by), "window_s": t1 - t0, "rows_in_window": rows,
            "rows_per_s": rows / (t1 - t0) if t1 > t0 else None, "t0": t0, "t1": t1}


def measure(work: Path, ckpt: Path, data: Path, gpus, cpu: bool, sampler: GpuSampler | None) -> dict:
    out = work / f"out-{gpus}"
    cfg = work / f"config-{gpus}.json"  # JSON is YAML
    cfg.write_text(json.dumps({
        "model": {"path": str(ckpt), **({"device": "cpu", "dtype": "float32"} if cpu else {})},
        "input": {"paths": [str(data / "*.parquet")], "columns": ["category"]}, "task": {"prompt": PROMPT},
        "output": {"path": str(out)},
        "run": {"gpus": gpus, "rows_per_unit": 32 if cpu else 1024, "log_every_s": 10}}))
    cmd = [sys.executable, "-m", "po_batch.cli", "run", str(cfg), "--restart"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stderr[-4000:]}")
    # the engine processes and their prep workers are all reaped by the time po-batch exits: their CPU time is here
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    docs = markers(out)
    window = steady(docs)
    engines = window["engines_committing"]
    record = {"gpus_setting": gpus, "engine_processes": engines, "exit_code": res.returncode, "wall_s": wall,
              "rows": sum(d["rows"] for d in docs), "rows_per_s_including_startup": sum(d["rows"] for d in docs) / wall,
              "steady": window, "cpu_cores_used": cpu_s / wall, "cpu_cores_used_per_engine": cpu_s / wall / engines,
              "summary": [line for line in res.stderr.splitlines() if "run done" in line or line.startswith("  ")]}
    if sampler is not None:
        busy = sampler.busy(window["t0"], window["t1"])
        record["device_busy_fraction"] = busy
    return record


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=None, help="corpus rows (default 32768; 1024 with --cpu-smoke)")
    ap.add_argument("--cpu-smoke", action="store_true", help="the tiny model, 1 vs 2 CPU engine processes")
    ap.add_argument("--work", default="/tmp/po-batch-bench-gpus")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cpu = args.cpu_smoke
    rows = args.rows or (1024 if cpu else 32768)
    work = Path(args.work) / ("cpu" if cpu else "gpu")
    ckpt = benchlib.make_checkpoint("qwen3_vl_2b", work / "qwen3_vl_2b", device="cpu" if cpu else "cuda", tiny=cpu)
    data = corpus(work / "data", rows)
    if cpu:
        settings = [1, 2]
        sampler = None
    else:
        import torch

        n = torch.cuda.device_count()
        settings = [1, "auto"] if n > 1 else [1]
        sampler = GpuSampler()
        sampler.start()
    runs = [measure(work, ckpt, data, g, cpu, sampler) for g in settings]
    if sampler is not None:
        sampler.stop.set()
    base = runs[0]["steady"]["rows_per_s"]
    for r in runs:
        rate = r["steady"]["rows_per_s"]
        r["scaling_over_one"] = rate / base if rate and base else None
        r["efficiency"] = r["scaling_over_one"] / r["engine_processes"] if r["scaling_over_one"] else None
    env = benchlib.environment()
    if not cpu:
        import torch

        env["gpu_count"] = torch.cuda.device_count()
    record = {"env": env, "rows": rows, "cores": len(os.sched_getaffinity(0)), "cpu_smoke": cpu, "runs": runs}
    # the smoke run checks the script, it measures nothing worth keeping: beside its work files
    default = work / "gpus-cpu-smoke.json" if cpu else \
        benchlib.ROOT / "bench" / "results" / f"gpus-{env['gpu_count']}x-h200-{env['date'][:10]}.json"
    benchlib.write_json(Path(args.out) if args.out else default, record)
    print(f"\n{'gpus':>6}{'engines':>8}{'steady rows/s':>15}{'scaling':>9}{'eff.':>7}{'cores/engine':>14}"
          f"{'busy per GPU':>30}")
    for r in runs:
        busy = ", ".join(f"{g}: {b:.2f}" for g, b in sorted(r.get("device_busy_fraction", {}).items())) or "-"
        rate, scale, eff = r["steady"]["rows_per_s"], r["scaling_over_one"], r["efficiency"]
        print(f"{r['gpus_setting']!s:>6}{r['engine_processes']:>8}{rate or 0:>15.1f}{scale or 0:>9.2f}{eff or 0:>7.2f}"
              f"{r['cpu_cores_used_per_engine']:>14.2f}{busy:>30}")


if __name__ == "__main__":
    main()
