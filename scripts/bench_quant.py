"""The fp8 path's activation + quantization in isolation, on the MLP shapes of the benchmark models at a full batch
(and the quantization alone of an attention output): po-batch's one-pass Triton kernel (layers/triton_quant.py)
against inductor's fusion of the same ops (what the engine compiled before, multi-kernel reductions on) and eager
torch, and the kernel with IEEE division (div_rn) in place of its reciprocal and fused multiply-add. Time, memory
rate, agreement of the e4m3 values with eager's.

    python scripts/bench_quant.py --out bench/results/quant.json
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from po_batch.layers import compile as fusion  # noqa: E402
from po_batch.layers.fp8 import quantize_rows  # noqa: E402
from po_batch.layers.mlp import activation  # noqa: E402

# (name, rows, width of the activation, activation, gated): the rows a 16384-token batch gives each MLP
SHAPES = [("qwen3_vl_2b vision fc1 (448², 64 images)", 65536, 4096, "gelu_pytorch_tanh", False),
          ("qwen3_vl_2b text gate_up", 16384, 6144, "silu", True),
          ("qwen2_vl_2b vision fc1 (448², 64 images)", 65536, 5120, "quick_gelu", False),
          ("qwen2_vl_2b text gate_up", 16384, 8960, "silu", True),
          ("qwen3_0_6b gate_up", 16384, 3072, "silu", True),
          ("gemma_2b gate_up", 16384, 16384, "gelu_pytorch_tanh", True),
          ("qwen3_vl_2b vision attention output", 65536, 1024, None, False),
          ("qwen3_vl_2b text attention output", 16384, 2048, None, False)]


def reference(x: torch.Tensor, act: str, gated: bool):
    n = x.shape[1] // 2 if gated else x.shape[1]
    if act is None:
        return quantize_rows(x)
    h = activation(act)(x[:, :n]) * x[:, n:] if gated else activation(act)(x)
    return quantize_rows(h)


def time_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(benchlib.ROOT / "bench" / "results" / "quant.json"))
    args = ap.parse_args()
    from po_batch.layers import triton_quant
    from po_batch.layers.triton_quant import act_quant

    fusion.FUSED.enable(True)  # inductor's settings as the engine has them
    compiled = torch.compile(reference, dynamic=True)
    record = {"env": benchlib.environment(), "shapes": []}
    torch.manual_seed(0)
    for name, rows, n, act, gated in SHAPES:
        x = torch.randn(rows, 2 * n if gated else n, device="cuda", dtype=torch.bfloat16)
        moved = x.numel() * 2 + rows * n + rows * 4  # bytes read and written once
        want_q, want_s = reference(x, act, gated)
        q, s = act_quant(x, act, gated)
        r = {"name": name, "rows": rows, "width": n, "act": act, "gated": gated,
             "e4m3_equal_to_eager": float((q.float() == want_q.float()).float().mean()),
             "max_scale_rel_diff": float((s / want_s - 1).abs().max())}
        for how, fn in [("eager", lambda: reference(x, act, gated)), ("inductor", lambda: compiled(x, act, gated)),
                        ("triton", lambda: act_quant(x, act, gated)),
                        ("triton_whole", lambda: act_quant(x, act, gated, chunked=False)),
                        ("triton_chunked", lambda: act_quant(x, act, gated, chunked=True)),
                        ("triton_div_rn", lambda: act_quant(x, act, gated))]:
            triton_quant.FMA_DIVISION = how != "triton_div_rn"
            ms = time_ms(fn)
            r[how] = {"ms": ms, "gb_per_s": moved / ms / 1e6}
            if how == "triton_div_rn":
                q_div, s_div = act_quant(x, act, gated)
                r[how]["e4m3_equal_to_fma_division"] = bool(torch.equal(q_div.float(), q.float())
                                                              and torch.equal(s_div, s))
            triton_quant.FMA_DIVISION = True
        r["triton_vs_inductor"] = r["inductor"]["ms"] / r["triton"]["ms"]
        record["shapes"].append(r)
        print(f"{name:<44} inductor {r['inductor']['ms']:6.3f} ms ({r['inductor']['gb_per_s']:5.0f} GB/s)  "
              + "  ".join(f"{how[7:] or 'picked'} {r[how]['ms']:6.3f} ({r[how]['gb_per_s']:5.0f})"
                          for how in ("triton", "triton_whole", "triton_chunked", "triton_div_rn"))
              + f"  {r['triton_vs_inductor']:.2f}x  e4m3 equal {r['e4m3_equal_to_eager']:.4f}", flush=True)
        x = q = s = want_q = want_s = None
        torch.cuda.empty_cache()
    benchlib.write_json(Path(args.out), record)


if __name__ == "__main__":
    main()
