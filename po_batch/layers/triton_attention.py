"""Causal attention over packed sequences as a Triton kernel (CUDA only), for the short sequences of a prefill
batch (a few hundred tokens each), where torch's varlen flash kernel reaches a tenth of the card's rate
(bench_attention.py). One program takes a block of one sequence's queries for one query head: it reads the keys up
to its last query only (bottom-right causal alignment: the queries are the last of their sequence's keys), the
shared K/V head of its group directly, and keeps the softmax online in float32."""

import torch
import triton
import triton.language as tl


@triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
             for m, n, w, s in [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2)]],
    key=["HEAD_DIM", "GROUP", "MAX_Q_BUCKET"])
@triton.jit
def _causal_fwd(Q, K, V, O, cu_q, cu_k, scale,
                sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
                MAX_Q_BUCKET, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    block, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q0, q1 = tl.load(cu_q + seq), tl.load(cu_q + seq + 1)
    k0, k1 = tl.load(cu_k + seq), tl.load(cu_k + seq + 1)
    lq, lk = q1 - q0, k1 - k0
    start = block * BLOCK_M
    if start >= lq:
        return
    kv_head = head // GROUP
    rows = start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + (q0 + rows)[:, None] * sq_t + head * sq_h + dims[None, :], mask=(rows < lq)[:, None], other=0.0)
    pos = rows + (lk - lq)  # each query's own position among the keys
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp2
    end = tl.minimum(lk, (lk - lq) + start + BLOCK_M)  # past the last key that the block's last query sees
    for n in range(0, end, BLOCK_N):
        cols = n + tl.arange(0, BLOCK_N)
        k = tl.load(K + (k0 + cols)[None, :] * sk_t + kv_head * sk_h + dims[:, None], mask=(cols < lk)[None, :],
                    other=0.0)
        s = tl.dot(q, k) * qk_scale
        s = tl.where((cols[None, :] <= pos[:, None]) & (cols < lk)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + (k0 + cols)[:, None] * sv_t + kv_head * sv_h + dims[None, :], mask=(cols < lk)[:, None],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + (q0 + rows)[:, None] * so_t + head * so_h + dims[None, :], acc.to(O.dtype.element_ty),
             mask=(rows < lq)[:, None])


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, scale: float | None = None) -> torch.Tensor:
    """q: (Tq, Hq, D), k/v: (Tk, Hkv, D) with unit stride in D -> (Tq, Hq, D); cu_q/cu_k: int32 (B+1,) offsets."""
    hq, d = q.shape[1], q.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch = len(cu_q) - 1
    bucket = 1 << max(0, int(max_q) - 1).bit_length()  # autotune per power of two of the longest query run
    grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), batch, hq)  # noqa: E731
    _causal_fwd[grid](q, k, v, out, cu_q, cu_k, scale if scale is not None else d ** -0.5,
                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                      out.stride(0), out.stride(1), bucket, HEAD_DIM=d, GROUP=hq // k.shape[1])
    return out
