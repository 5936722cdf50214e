"""Attention kernels on the engine's own packed shapes, in isolation: torch's varlen flash kernel and po-batch's
Triton kernel (causal, and full for the vision towers) against cuDNN's dense kernel (same-size images: the path the
engine took for them before) and its ragged kernel (the same packed layout, cumulative lengths) with grouped K/V
heads read directly or repeated, and SDPA over right-padded, length-sorted sequences (causal: a real query sees
only real keys). Each variant's output is compared with the flash kernel's on the real rows; time is the median of
CUDA-event timed repeats. Prints a table and writes JSON (card, versions, date, command).
    python3 scripts/bench_attention.py --out bench/results/attention.json"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from po_batch.layers.attention import _dense  # noqa: E402
from po_batch.layers.triton_attention import triton_attention  # noqa: E402

# name: (query heads, K/V heads, head dim, causal, sequence lengths (low, high), total tokens)
SHAPES = {
    "qwen3_0_6b_text_16k": (16, 8, 128, True, (250, 370), 16384),
    "qwen3_0_6b_text_64k": (16, 8, 128, True, (250, 370), 65536),
    "qwen3_vl_2b_text_16k": (16, 8, 128, True, (240, 270), 16384),
    "qwen2_vl_2b_text_16k": (12, 2, 128, True, (240, 270), 16384),
    "qwen3_vl_2b_vision_784": (16, 16, 64, False, (784, 784), 16384 * 4),
    "qwen2_vl_2b_vision_1024": (16, 16, 80, False, (1024, 1024), 16384 * 4),
    "qwen3_vl_2b_vision_mixed": (16, 16, 64, False, (256, 4096), 16384 * 4),
    "qwen2_5_vl_3b_vision_window": (16, 16, 80, False, (256, 256), 16384 * 4),
}


def lengths(low: int, high: int, total: int, rng) -> list[int]:
    out = []
    while sum(out) + high <= total:
        out.append(int(rng.integers(low, high + 1)))
    return out


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def flash(q, k, v, cu, mx, causal):
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, mx, mx, 0.0, causal, return_debug_mask=False)[0]


def cudnn(q, k, v, cu, mx, causal):
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, mx, mx, False, 0.0, causal, False)[0]


def cudnn_repeat(q, k, v, cu, mx, causal):
    rep = q.shape[1] // k.shape[1]
    return cudnn(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), cu, mx, causal)


def padded(q, k, v, lens, causal, index):
    """Right-padded (B, H, L, D), longest first, through SDPA (cuDNN first), and back to the packed rows."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, length = len(lens), max(lens)

    def pad(t):
        out = t.new_zeros(b * length, t.shape[1], t.shape[2])
        out[index] = t
        return out.view(b, length, t.shape[1], t.shape[2]).transpose(1, 2)

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=causal,
                                           enable_gqa=q.shape[1] != k.shape[1])
    return o.transpose(1, 2).reshape(b * length, q.shape[1], q.shape[2])[index]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=str(benchlib.ROOT / "bench" / "results" / "attention.json"))
    args = ap.parse_args()
    record = {"env": benchlib.environment(), "cudnn": torch.backends.cudnn.version(), "shapes": {}}
    rng = np.random.default_rng(0)
    for name in args.shapes.split(","):
        hq, hkv, d, causal, (low, high), total = SHAPES[name]
        lens = sorted(lengths(low, high, total, rng), reverse=True)
        t = sum(lens)
        q = torch.randn(t, hq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16)
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device="cuda")
        mx = max(lens)
        starts = np.arange(len(lens)) * mx
        index = torch.from_numpy(np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lens)])).cuda()
        pairs = sum(n * (n + 1) / 2 if causal else n * n for n in lens)
        flops = 4 * pairs * hq * d
        ref = flash(q, k, v, cu, mx, causal).float()
        variants = {"flash_varlen": lambda: flash(q, k, v, cu, mx, causal),
                    "triton": lambda: triton_attention(q, k, v, cu, cu, mx, causal),
                    "cudnn_dense": (lambda: _dense(q, k, v, low)) if low == high and not causal else None,
                    "cudnn_ragged_gqa": lambda: cudnn(q, k, v, cu, mx, causal),
                    "cudnn_ragged_repeat_kv": lambda: cudnn_repeat(q, k, v, cu, mx, causal),
                    "sdpa_padded_sorted": lambda: padded(q, k, v, lens, causal, index)}
        result = {"tokens": t, "sequences": len(lens), "heads": [hq, hkv], "head_dim": d, "causal": causal}
        for vname, fn in variants.items():
            if fn is None:
                continue
            try:
                out = fn()
                err = float((out.float() - ref).abs().max())
                ms = timed(fn, args.reps)
                result[vname] = {"ms": ms, "tflops": flops / ms / 1e9, "max_abs_diff_vs_flash": err}
            except Exception as e:  # a kernel this torch or cuDNN lacks is a row of the table, not the end
                result[vname] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"{name:<26}{vname:<24}{result[vname]}", flush=True)
        record["shapes"][name] = result
        benchlib.write_json(Path(args.out), record)


if __name__ == "__main__":
    main()
