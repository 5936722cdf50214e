"""An MLP's second matmul with its activation applied as the first matmul's output is read (CUDA only, Triton):
out = act(h) @ W.T, or act(gate) * up @ W.T for a gated MLP (h = gate then up), plus a bias, plus a residual added
in place. Separately, the activation is a pass over the widest activations of the layer: it reads them and writes
their activated copy, which the matmul then reads again. Here each program reads its block of h, applies the
activation in float32 and rounds it to the model's dtype (as the separate pass stores it), and feeds the tensor
cores from registers. A custom op: compiled graphs call it as it is."""

import torch
import triton
import triton.language as tl

from po_batch.layers.triton_quant import ACTS, activate

CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
           for m, n, k, w, s in [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3),
                                 (256, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                 (128, 128, 32, 4, 5), (128, 256, 32, 8, 4)]]


@triton.autotune(configs=CONFIGS, key=["M_BUCKET", "N", "K", "ACT", "GATED", "HAS_BIAS", "HAS_RES"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _act_matmul(H, W, B, R, O, M, N, K, M_BUCKET, stride_h, stride_w, stride_r, stride_o,
                ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                EVEN_K: tl.constexpr):
    # programs in groups of GROUP_M row blocks that walk the column blocks together, so W's blocks stay in L2
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * blocks_n)
    first = group * GROUP_M
    size = tl.minimum(blocks_m - first, GROUP_M)
    pid_m = first + (pid % (GROUP_M * blocks_n)) % size
    pid_n = (pid % (GROUP_M * blocks_n)) // size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # rows and columns past the ends read row 0 (their results are not stored): no mask in the loop but K's
    a = H + tl.where(rows < M, rows, 0).to(tl.int64)[:, None] * stride_h + ks[None, :]
    b = W + tl.where(cols < N, cols, 0).to(tl.int64)[None, :] * stride_w + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = activate(tl.load(a).to(tl.float32), ACT)
            if GATED:
                x = x * tl.load(a + K).to(tl.float32)
            w = tl.load(b)
        else:
            inside = ks < K - k * BLOCK_K
            x = activate(tl.load(a, mask=inside[None, :], other=0.0).to(tl.float32), ACT)
            if GATED:
                x = x * tl.load(a + K, mask=inside[None, :], other=0.0).to(tl.float32)
            w = tl.load(b, mask=inside[:, None], other=0.0)
        acc = tl.dot(x.to(w.dtype), w, acc)
        a += BLOCK_K
        b += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    if HAS_RES:
        acc += tl.load(R + rows.to(tl.int64)[:, None] * stride_r + cols[None, :], mask=mask).to(tl.float32)
    tl.store(O + rows.to(tl.int64)[:, None] * stride_o + cols[None, :], acc.to(O.dtype.element_ty), mask=mask)


def _launch(h, weight, bias, residual, out, act: int, gated: bool) -> None:
    m, n, k = h.shape[0], weight.shape[0], weight.shape[1]
    h = h if h.stride(1) == 1 else h.contiguous()
    res = residual if residual is not None else out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _act_matmul[grid](h, weight, bias if bias is not None else weight, res, out, m, n, k,
                      1 << max(0, m - 1).bit_length(), h.stride(0), weight.stride(0), res.stride(0), out.stride(0),
                      ACT=act, GATED=gated, HAS_BIAS=bias is not None, HAS_RES=residual is not None)


# Registered through the low-level library API, as layers/residual.py's op: fewer host checks per call.
_LIB = torch.library.Library("po_batch", "FRAGMENT")
_LIB.define("act_matmul(Tensor h, Tensor weight, Tensor? bias, int act, bool gated) -> Tensor")
_LIB.define("add_act_matmul_(Tensor(a!) x, Tensor h, Tensor weight, Tensor? bias, int act, bool gated) -> ()")


def _act_matmul_op(h, weight, bias, act, gated):
    out = h.new_empty((h.shape[0], weight.shape[0]))
    _launch(h, weight, bias, None, out, act, gated)
    return out


def _add_act_matmul_op(x, h, weight, bias, act, gated):
    _launch(h, weight, bias, x, x, act, gated)


_LIB.impl("act_matmul", _act_matmul_op, "CompositeExplicitAutograd")
_LIB.impl("add_act_matmul_", _add_act_matmul_op, "CompositeExplicitAutograd")
torch.library.register_fake("po_batch::act_matmul", lambda h, weight, bias, act, gated:
                            h.new_empty((h.shape[0], weight.shape[0])), lib=_LIB)
torch.library.register_fake("po_batch::add_act_matmul_", lambda x, h, weight, bias, act, gated: None, lib=_LIB)


def act_matmul(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None, gated: bool,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(h) @ weight.T (+ bias) for h (M, K), or (M, 2K) gate then up when gated; with `residual` (M, N), the
    caller's own contiguous tensor, the result is added into it in place and it is returned."""
    if residual is None:
        return torch.ops.po_batch.act_matmul(h, weight, bias, ACTS[act], gated)
    torch.ops.po_batch.add_act_matmul_(residual, h, weight, bias, ACTS[act], gated)
    return residual
