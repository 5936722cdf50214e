"""The activation of an MLP and the fp8 quantization of its result in one kernel (CUDA only, Triton): each program
takes one row of the first matmul's output (gate and up halves when gated), applies the activation, rounds to the
model's dtype as the second matmul's input would be, and writes the row in e4m3 with its scale. A row is held in
registers and read once where its width fills at least 3/4 of a power of two; wider blocks of masked lanes were
slower on an H200 than reading the row twice in chunks (the maximum first; the second read mostly from L2):
bench/results/quant-h200-2026-12-03.json. Compiled alone, inductor's fusion of the same ops ran Qwen3-VL's vision
GELU rows at a third of the card's memory rate; inside the engine's graphs it does better, and this kernel made
fp8 Qwen3-VL-2B 2.6% faster (engine-h200-2026-12-03-fp8-quant.json). A custom op: compiled graphs call it as it
is."""

import torch
import triton
import triton.language as tl

ACTS = {None: 0, "silu": 1, "gelu": 2, "gelu_pytorch_tanh": 3, "quick_gelu": 4}
CHUNK = 1024
# h / scale as h times the row's reciprocal, corrected by one fused multiply-add (Markstein's division: the same
# correctly rounded quotient as IEEE division, in three instructions where div_rn takes a dozen; the kernel's
# arithmetic, not memory, bounds it on the activations' rows). A switch so that benchmarks can compare both.
FMA_DIVISION = True


@triton.jit
def _act(X, row, stride_x, n, cols, mask, ACT: tl.constexpr, GATED: tl.constexpr):
    """act(x) (* up) of the columns `cols` of one row, rounded to X's dtype, in float32."""
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == 1:
        h = x * tl.sigmoid(x)
    elif ACT == 2:
        h = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 3:  # 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
        h = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    elif ACT == 4:
        h = x * tl.sigmoid(1.702 * x)
    else:
        h = x
    if GATED:
        h = h * tl.load(X + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    return h.to(X.dtype.element_ty).to(tl.float32)


@triton.jit
def _divide(h, scale, FMA: tl.constexpr):
    """h / scale, correctly rounded (float32)."""
    if FMA:
        inv = tl.math.div_rn(1.0, scale)
        q = h * inv
        return tl.fma(tl.fma(-q, scale, h), inv, q)
    return tl.math.div_rn(h, scale)


@triton.jit
def _act_quant_whole(X, Q, S, n, stride_x, stride_q, ACT: tl.constexpr, GATED: tl.constexpr, FMA: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    h = _act(X, row, stride_x, n, cols, mask, ACT, GATED)
    scale = tl.maximum(tl.max(tl.abs(h), 0), 1e-12) / 448.0  # fp8.E4M3_MAX
    tl.store(Q + row * stride_q + cols, _divide(h, scale, FMA).to(Q.dtype.element_ty), mask=mask)
    tl.store(S + row, scale)


@triton.jit
def _act_quant_chunked(X, Q, S, n, stride_x, stride_q, ACT: tl.constexpr, GATED: tl.constexpr, FMA: tl.constexpr,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    top = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        top = tl.maximum(top, tl.abs(_act(X, row, stride_x, n, cols, cols < n, ACT, GATED)))
    scale = tl.maximum(tl.max(top, 0), 1e-12) / 448.0
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        h = _act(X, row, stride_x, n, cols, cols < n, ACT, GATED)
        tl.store(Q + row * stride_q + cols, _divide(h, scale, FMA).to(Q.dtype.element_ty), mask=cols < n)
    tl.store(S + row, scale)


@torch.library.custom_op("po_batch::act_quant", mutates_args=())
def _act_quant_op(x: torch.Tensor, act: int, gated: bool, chunked: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x if x.stride(1) == 1 else x.contiguous()
    rows, n = x.shape[0], x.shape[1] // 2 if gated else x.shape[1]
    q = torch.empty((rows, n), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    whole = triton.next_power_of_2(n)
    if chunked == 1 or (chunked == -1 and 4 * n < 3 * whole):
        _act_quant_chunked[(rows,)](x, q, s, n, x.stride(0), q.stride(0), ACT=act, GATED=gated, FMA=FMA_DIVISION,
                                    BLOCK=CHUNK, num_warps=4)
    else:
        _act_quant_whole[(rows,)](x, q, s, n, x.stride(0), q.stride(0), ACT=act, GATED=gated, FMA=FMA_DIVISION,
                                  BLOCK=whole, num_warps=min(32, max(4, whole // 512)))
    return q, s


@_act_quant_op.register_fake
def _(x, act, gated, chunked):
    n = x.shape[1] // 2 if gated else x.shape[1]
    return x.new_empty((x.shape[0], n), dtype=torch.float8_e4m3fn), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def act_quant(x: torch.Tensor, act: str | None, gated: bool, chunked: bool | None = None):
    """(M, K) in the model's dtype (K = 2n when gated: gate then up) -> e4m3 (M, n) and float32 scales (M, 1).
    `chunked`: None picks by the width; True/False force one kernel (the two give the same bits)."""
    return _act_quant_op(x, ACTS[act], gated, -1 if chunked is None else int(chunked))
