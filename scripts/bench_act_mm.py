"""An MLP's activation applied inside its second matmul (layers/triton_act_mm.py) against the separate pass and
cuBLAS (the engine's compiled path before), on the MLP shapes of the benchmark models at a full batch: the whole MLP
compiled both ways, its second half alone (activation + second matmul + residual), cuBLAS's matmul alone on the
activated input, and the Triton kernel without an activation (its matmul alone). Time, TFLOP/s of the second matmul,
and the largest difference between the two paths' outputs against the outputs' scale.

    python scripts/bench_act_mm.py --out bench/results/act-mm.json
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from bench_quant import time_ms  # noqa: E402

from po_batch.layers import compile as fusion  # noqa: E402
from po_batch.layers import mlp as mlp_layers  # noqa: E402
from po_batch.layers.mlp import MLP, GatedMLP, activation  # noqa: E402
from po_batch.layers.residual import add_projection  # noqa: E402
from po_batch.layers.triton_act_mm import _act_matmul, act_matmul  # noqa: E402

# (name, rows, width, hidden, activation, gated, bias): the rows a 16384-token batch gives each MLP
SHAPES = [("qwen3_vl_2b text MLP", 16384, 2048, 6144, "silu", True, False),
          ("qwen2_vl_2b text MLP", 16384, 1536, 8960, "silu", True, False),
          ("qwen2_vl_2b vision MLP (448², 64 images)", 65536, 1280, 5120, "quick_gelu", False, True),
          ("qwen2_5_vl_3b vision MLP (448², 64 images)", 65536, 1280, 3420, "silu", True, True),
          ("qwen3_0_6b MLP", 16384, 1024, 3072, "silu", True, False)]


def build(width: int, hidden: int, act: str, gated: bool, bias: bool) -> torch.nn.Module:
    m = GatedMLP(width, hidden, act, bias=bias) if gated else MLP(width, hidden, act, bias=bias)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return m.cuda().bfloat16().eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(benchlib.ROOT / "bench" / "results" / "act-mm.json"))
    args = ap.parse_args()
    fusion.FUSED.enable(True)  # inductor's settings as the engine has them
    record = {"env": benchlib.environment(), "shapes": []}
    torch.manual_seed(0)
    for name, rows, width, hidden, act, gated, bias in SHAPES:
        m = build(width, hidden, act, gated, bias)
        second = m.down_proj if gated else m.fc2
        x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
        h = (m.gate_up_proj if gated else m.fc1)(x)
        a = (activation(act)(h[:, :hidden]) * h[:, hidden:] if gated else activation(act)(h))
        flops = 2 * rows * hidden * width
        out = {}
        with torch.no_grad():
            for how, switch in [("separate", False), ("fused", True)]:
                mlp_layers.ACT_MATMUL = switch
                torch._dynamo.reset()
                whole = torch.compile(lambda x, r: m(x, residual=r), dynamic=True)
                half = torch.compile(lambda h, r: add_projection(r, second, activation(act)(h[:, :hidden]) * h[:, hidden:]
                                                                 if gated else activation(act)(h)), dynamic=True)
                out[how] = whole(x, r.clone()).float()
                res = r.clone()
                out[how + "_ms"] = time_ms(lambda: whole(x, res))
                if not switch:
                    out["second_half_separate_ms"] = time_ms(lambda: half(h, res))
            mlp_layers.ACT_MATMUL = True
            res = r.clone()
            fused_half = time_ms(lambda: act_matmul(h, second.weight, second.bias, act, gated, res))
            cublas = time_ms(lambda: res.addmm_(a, second.weight.t()))
            triton_mm = time_ms(lambda: act_matmul(a, second.weight, None, None, False, res))
        scale = out["separate"].abs().max().item()
        d = {"name": name, "rows": rows, "width": width, "hidden": hidden, "act": act, "gated": gated, "bias": bias,
             "mlp_separate_ms": out["separate_ms"], "mlp_fused_ms": out["fused_ms"],
             "mlp_speedup": out["separate_ms"] / out["fused_ms"],
             "second_half_separate_ms": out["second_half_separate_ms"], "second_half_fused_ms": fused_half,
             "second_half_speedup": out["second_half_separate_ms"] / fused_half,
             "cublas_matmul_ms": cublas, "triton_matmul_ms": triton_mm,
             "tflops": {k: flops / ms / 1e9 for k, ms in [("second_half_fused", fused_half), ("cublas", cublas),
                                                          ("triton", triton_mm)]},
             "max_abs_diff": (out["fused"] - out["separate"]).abs().max().item(), "output_scale": scale,
             "picked": {str(k): str(v) for k, v in _act_matmul.cache.items()}}
        record["shapes"].append(d)
        print(f"{name:<44} MLP {d['mlp_separate_ms']:6.3f} -> {d['mlp_fused_ms']:6.3f} ms ({d['mlp_speedup']:.3f}x)  "
              f"2nd half {d['second_half_separate_ms']:6.3f} -> {fused_half:6.3f} ({d['second_half_speedup']:.3f}x)  "
              f"matmul cuBLAS {cublas:6.3f} Triton {triton_mm:6.3f}  "
              f"TFLOP/s fused {d['tflops']['second_half_fused']:.0f} cuBLAS {d['tflops']['cublas']:.0f}  "
              f"diff {d['max_abs_diff']:.3g} of {scale:.3g}", flush=True)
    benchlib.write_json(Path(args.out), record)


if __name__ == "__main__":
    main()
