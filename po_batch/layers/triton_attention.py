"""Attention over packed sequences as a Triton kernel (CUDA only): causal for the short sequences of a prefill batch
(a few hundred tokens each), where torch's varlen flash kernel reaches a tenth of the card's rate
(bench_attention.py), and full (bidirectional) for the vision towers' images. One program takes a block of one
sequence's queries for one query head: it reads the keys it sees only (causal: up to its last query, bottom-right
aligned, the queries being the last of their sequence's keys), the shared K/V head of its group directly, and keeps
the softmax online in float32. A head dim that is not a power of two (80: Qwen2-VL's and Qwen2.5-VL's towers) is a
power-of-two part and a power-of-two tail (64 + 16), each its own matmul, so no column is padded. On an H200
(bench_attention.py, attention-h200-2026-12-03*.json): 1.15x cuDNN's dense kernel on Qwen3-VL's 784-token images,
1.37x torch's flash kernel on mixed sizes, 1.3-1.6x it on the decoders' sequences; 0.89x cuDNN at head dim 80."""

import torch
import triton
import triton.language as tl


@triton.jit
def _keys(q, q_tail, acc, acc_tail, m_i, l_i, K, V, k0, n, lk, pos, kv_head, sk_t, sk_h, sv_t, sv_h, qk_scale,
          HEAD: tl.constexpr, TAIL: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """One block of keys n:n+BLOCK_N into the online softmax; MASK: some of them lie past the sequence's end or
    past a query's own position (causal), so the scores are masked."""
    cols = n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD)
    k_cols = K + (k0 + cols)[None, :] * sk_t + kv_head * sk_h
    v_rows = V + (k0 + cols)[:, None] * sv_t + kv_head * sv_h
    if MASK:
        k = tl.load(k_cols + dims[:, None], mask=(cols < lk)[None, :], other=0.0)
    else:
        k = tl.load(k_cols + dims[:, None])
    s = tl.dot(q, k)
    if TAIL > 0:
        tail = HEAD + tl.arange(0, TAIL)
        if MASK:
            s = tl.dot(q_tail, tl.load(k_cols + tail[:, None], mask=(cols < lk)[None, :], other=0.0), s)
        else:
            s = tl.dot(q_tail, tl.load(k_cols + tail[:, None]), s)
    if MASK:
        seen = (cols < lk)[None, :]
        if CAUSAL:
            seen = seen & (cols[None, :] <= pos[:, None])
        s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # the running maximum, scaled to exp2's units
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASK:
        v = tl.load(v_rows + dims[None, :], mask=(cols < lk)[:, None], other=0.0)
    else:
        v = tl.load(v_rows + dims[None, :])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    if TAIL > 0:
        if MASK:
            v_tail = tl.load(v_rows + tail[None, :], mask=(cols < lk)[:, None], other=0.0)
        else:
            v_tail = tl.load(v_rows + tail[None, :])
        acc_tail = acc_tail * alpha[:, None] + tl.dot(p.to(v.dtype), v_tail)
    return acc, acc_tail, m_new, l_i


@triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
             for m, n, w, s in [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2)]],
    key=["HEAD", "TAIL", "GROUP", "CAUSAL", "RANGES", "MAX_Q_BUCKET"])
@triton.jit
def _attention_fwd(Q, K, V, O, cu_q, cu_k, ranges, scale,
                   sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
                   MAX_Q_BUCKET, HEAD: tl.constexpr, TAIL: tl.constexpr, GROUP: tl.constexpr,
                   CAUSAL: tl.constexpr, RANGES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """RANGES: a sequence's own keys are rows ranges[seq, 0:2] of K and V, after its ancestors' ranges[seq, 2:4]
    (a shared prefix, seen whole by every query); else its keys are rows cu_k[seq]:cu_k[seq + 1]."""
    block, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q0, q1 = tl.load(cu_q + seq), tl.load(cu_q + seq + 1)
    if RANGES:
        k0, k1 = tl.load(ranges + seq * 4), tl.load(ranges + seq * 4 + 1)
    else:
        k0, k1 = tl.load(cu_k + seq), tl.load(cu_k + seq + 1)
    lq, lk = q1 - q0, k1 - k0
    start = block * BLOCK_M
    if start >= lq:
        return
    kv_head = head // GROUP
    rows = start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD)
    q_rows = Q + (q0 + rows)[:, None] * sq_t + head * sq_h
    q = tl.load(q_rows + dims[None, :], mask=(rows < lq)[:, None], other=0.0)
    q_tail = q  # a placeholder where the head has no tail
    acc_tail = tl.zeros([BLOCK_M, 16], tl.float32)
    if TAIL > 0:
        tail = HEAD + tl.arange(0, TAIL)
        q_tail = tl.load(q_rows + tail[None, :], mask=(rows < lq)[:, None], other=0.0)
        acc_tail = tl.zeros([BLOCK_M, TAIL], tl.float32)
    pos = rows + (lk - lq)  # each query's own position among the keys
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD], tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp2
    if RANGES:  # the ancestors' keys first: every query sees all of them
        p0, p1 = tl.load(ranges + seq * 4 + 2), tl.load(ranges + seq * 4 + 3)
        lp = p1 - p0
        for n in range(0, lp // BLOCK_N * BLOCK_N, BLOCK_N):
            acc, acc_tail, m_i, l_i = _keys(q, q_tail, acc, acc_tail, m_i, l_i, K, V, p0, n, lp, pos, kv_head,
                                            sk_t, sk_h, sv_t, sv_h, qk_scale, HEAD, TAIL, False, False, BLOCK_N)
        for n in range(lp // BLOCK_N * BLOCK_N, lp, BLOCK_N):
            acc, acc_tail, m_i, l_i = _keys(q, q_tail, acc, acc_tail, m_i, l_i, K, V, p0, n, lp, pos, kv_head,
                                            sk_t, sk_h, sv_t, sv_h, qk_scale, HEAD, TAIL, False, True, BLOCK_N)
    end = lk  # past the last key that a query of the block sees
    clear = lk // BLOCK_N * BLOCK_N  # full attention: the blocks before it need no mask
    if CAUSAL:  # one masked loop: the decoders' sequences are a few blocks long, and a second loop's pipeline
        end = tl.minimum(lk, (lk - lq) + start + BLOCK_M)  # start-up cost more than the masks (25-30%, H200)
        clear = 0
    for n in range(0, clear, BLOCK_N):
        acc, acc_tail, m_i, l_i = _keys(q, q_tail, acc, acc_tail, m_i, l_i, K, V, k0, n, lk, pos, kv_head, sk_t,
                                        sk_h, sv_t, sv_h, qk_scale, HEAD, TAIL, CAUSAL, False, BLOCK_N)
    for n in range(clear, end, BLOCK_N):
        acc, acc_tail, m_i, l_i = _keys(q, q_tail, acc, acc_tail, m_i, l_i, K, V, k0, n, lk, pos, kv_head, sk_t,
                                        sk_h, sv_t, sv_h, qk_scale, HEAD, TAIL, CAUSAL, True, BLOCK_N)
    o_rows = O + (q0 + rows)[:, None] * so_t + head * so_h
    tl.store(o_rows + dims[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty), mask=(rows < lq)[:, None])
    if TAIL > 0:
        tl.store(o_rows + tail[None, :], (acc_tail / l_i[:, None]).to(O.dtype.element_ty), mask=(rows < lq)[:, None])


def split_head(d: int) -> tuple[int, int] | None:
    """A head dim as the kernel's (power-of-two part, power-of-two tail or 0), both at least 16 (the matmul's
    smallest side); None where it is not two such parts."""
    head = 1 << (d.bit_length() - 1)
    tail = d - head
    if head < 16 or (tail and (tail < 16 or tail & (tail - 1))):
        return None
    return head, tail


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, causal: bool, scale: float | None = None,
                     ranges: torch.Tensor | None = None) -> torch.Tensor:
    """q: (Tq, Hq, D), k/v: (Tk, Hkv, D) with unit stride in D -> (Tq, Hq, D); cu_q/cu_k: int32 (B+1,) offsets;
    `ranges`: int32 (B, 4), each sequence's own key rows and its ancestors' (Varlen.ranges), in place of cu_k."""
    hq, d = q.shape[1], q.shape[2]
    head, tail = split_head(d)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch = len(cu_q) - 1
    bucket = 1 << max(0, int(max_q) - 1).bit_length()  # autotune per power of two of the longest query run
    grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), batch, hq)  # noqa: E731
    _attention_fwd[grid](q, k, v, out, cu_q, cu_k, cu_k if ranges is None else ranges,
                         scale if scale is not None else d ** -0.5,
                         q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                         out.stride(0), out.stride(1), bucket, HEAD=head, TAIL=tail, GROUP=hq // k.shape[1],
                         CAUSAL=causal, RANGES=ranges is not None)
    return out
