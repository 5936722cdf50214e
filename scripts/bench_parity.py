"""bf16 parity against a float32 reference on the GPU: po-batch bf16 and transformers bf16 are each compared with
transformers float32 on the same inputs (random weights with Qwen3-VL-2B's shapes, 448x448 JPEGs). With random
weights most yes/no margins are tiny, so answer agreement is also reported on rows whose float32 margin is clear.

    python scripts/bench_parity.py [--samples 128]
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine  # noqa: E402
import benchlib  # noqa: E402
from bench_engine import VL_PROMPT, bench_hf, rows_for  # noqa: E402

from po_batch.config import config_from_dict  # noqa: E402
from po_batch.spec import open_spec  # noqa: E402


def compare(x: np.ndarray, ref: np.ndarray, margin: float) -> dict:
    same = benchlib.same_answer(x, ref)
    clear = np.abs(ref[:, 0] - ref[:, 1]) >= margin
    return {"max_abs_dp_yes": float(np.abs(benchlib.p_yes(x) - benchlib.p_yes(ref)).max()),
            "max_abs_dlogit": float(np.abs(x - ref).max()),
            "agreement": float(same.mean()), "agreement_clear_margin": float(same[clear].mean()),
            "clear_rows": int(clear.sum())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--margin", type=float, default=0.05, help="|yes - no| float32 logit margin counted as clear")
    ap.add_argument("--work", default="/tmp/po-batch-bench")
    ap.add_argument("--out", default=str(benchlib.ROOT / "bench" / "results" / "parity.json"))
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU, to check the script itself")
    args = ap.parse_args()
    device = "cpu" if args.cpu_smoke else "cuda"
    bench_engine.DEVICE = device
    ckpt = benchlib.make_checkpoint("qwen3_vl_2b", Path(args.work) / "qwen3_vl_2b", device, tiny=args.cpu_smoke)
    cfg = config_from_dict({"model": {"path": str(ckpt)}, "output": {"path": "/tmp/unused"},
                            "input": {"paths": ["/tmp/unused.parquet"], "columns": ["category"]},
                            "task": {"prompt": VL_PROMPT}})
    rows = rows_for("448", args.samples)
    spec = open_spec(cfg, device, "bfloat16", workers=0)
    ours = spec.load_engine().score([spec.prep(r) for r in rows])[:, 0]
    ids = spec.tasks.candidates
    del spec
    bench_engine.reset_memory()
    hf_bf16 = bench_hf(ckpt, rows, cfg, ids, (16,))["logits"]
    bench_engine.DTYPE = "float32"
    hf_fp32 = bench_hf(ckpt, rows, cfg, ids, (16,))["logits"]
    margins = np.abs(hf_fp32[:, 0] - hf_fp32[:, 1])
    record = {"env": benchlib.environment(), "samples": args.samples, "margin": args.margin,
              "fp32_margin_quantiles": {q: float(np.quantile(margins, q)) for q in (0.1, 0.5, 0.9)},
              "pobatch_bf16_vs_hf_fp32": compare(ours, hf_fp32, args.margin),
              "hf_bf16_vs_hf_fp32": compare(hf_bf16, hf_fp32, args.margin),
              "pobatch_bf16_vs_hf_bf16": compare(ours, hf_bf16, args.margin)}
    benchlib.write_json(Path(args.out), record)
    print(f"\n{'comparison':<28}{'max dP':>9}{'max dlogit':>12}{'agree':>8}{'agree clear':>13}")
    for k in ("pobatch_bf16_vs_hf_fp32", "hf_bf16_vs_hf_fp32", "pobatch_bf16_vs_hf_bf16"):
        r = record[k]
        print(f"{k:<28}{r['max_abs_dp_yes']:>9.4f}{r['max_abs_dlogit']:>12.4f}{r['agreement']:>8.3f}"
              f"{r['agreement_clear_margin']:>13.3f}")


if __name__ == "__main__":
    main()
