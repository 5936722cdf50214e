"""Variable-length attention over packed sequences: flash-attn's varlen kernel when installed, torch's
varlen kernel on CUDA otherwise (the decoders' causal attention and the vision towers' full attention through
po-batch's Triton kernel, layers/triton_attention.py), and SDPA one sequence at a time on the CPU. Each sequence sees
only itself.

Without flash-attn, Gemma2's soft-capped scores (no torch kernel caps them) take the per-sequence path on CUDA too:
exact, and slow (a Python loop over sequences, each one's scores materialised)."""

import functools

import torch
import torch.nn.functional as F

from po_batch.layers.context import Varlen


@functools.cache
def _flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_flash() -> bool:
    """torch's own varlen flash kernel (CUDA builds): called as the aten op, whose signature is the same on 2.11 and
    2.14 (grouped K/V heads, a scale and a window on both), not through torch.nn.attention.varlen.varlen_attn, whose
    signature changed between those releases and which on newer ones picks cuDNN's ragged kernel on Hopper: 40 ms
    a call against the flash kernel's 0.25 ms at the engine's shapes (bench_attention.py, torch 2.11, cuDNN 9.19)."""
    available = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    return available() and hasattr(torch.ops.aten, "_flash_attention_forward")


def backend(device: torch.device) -> str:
    if device.type != "cuda":
        return "sdpa"
    if _flash_attn() is not None:
        return "flash_attn"
    if _torch_flash():
        return "torch_varlen"
    return "sdpa"


# Equal-length sequences (a batch of same-size images) take the dense batched path on CUDA, where cuDNN's
# Hopper attention kernel is faster than the varlen flash kernel. A switch so benchmarks can compare both.
DENSE_WHEN_UNIFORM = True
# Grouped-query attention: the flash kernel reads the shared K/V heads itself; repeating them costs two copies a
# layer. A switch so benchmarks can compare both.
GQA_DIRECT = True
# Causal attention (the decoders) through po-batch's Triton kernel (layers/triton_attention.py) rather than torch's
# varlen flash kernel, where it applies: no window or soft-cap, head dim 64, 80 or 128, half precision. A switch so
# benchmarks can compare both.
TRITON_CAUSAL = True
# Full attention (the vision towers) through the same kernel rather than cuDNN's (same-size images) or the flash
# kernel (mixed sizes). A switch so benchmarks can compare them.
TRITON_FULL = True
# A batch's shared prefix (engine/batch.py) read by the Triton kernel where its keys are (Varlen.ranges) rather than
# gathered after it for every sequence (a copy of the batch's keys a layer). Off until it is measured on a card:
# the kernel's extra loops over the prefix may cost more than the copy (one loop each for the causal keys measured
# faster than two, see triton_attention.py). Tested through Triton's interpreter (tests/test_layers.py). Read where
# the batch is built (engine/batch.py): with it off, no batch carries the ranges.
PREFIX_IN_PLACE = False


def _triton_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> bool:
    return ((TRITON_CAUSAL if causal else TRITON_FULL) and q.shape[-1] in (64, 80, 128)
            and q.dtype in (torch.bfloat16, torch.float16) and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Varlen, causal: bool,
                     scale: float | None = None, softcap: float | None = None,
                     window: int | None = None) -> torch.Tensor:
    """q: (Tq, Hq, D), k/v: (Tk, Hkv, D) -> (Tq, Hq, D). Causal masks align to the end of each key sequence,
    so a sequence whose queries are only its last positions (or whose keys begin with a shared prefix's) sees all
    of its keys up to each query. `scale` multiplies the scores (None: 1/sqrt(D)); `softcap` c maps them to
    c*tanh(s/c) before the mask (Gemma2); `window` W lets a query see only the W keys ending at its own position
    (the sliding-window layers of a causal decoder)."""
    if scale == q.shape[-1] ** -0.5:
        scale = None  # the kernels' own default, which a kernel without a scale argument also serves
    kind = backend(q.device)
    plain = softcap is None and window is None
    if meta.ranges is not None and kind == "torch_varlen" and plain and _triton_applies(q, k, v, causal):
        from po_batch.layers.triton_attention import triton_attention  # the keys read in place, not gathered

        return triton_attention(q, k, v, meta.cu_q, meta.cu_k, meta.max_q, causal, scale, meta.ranges)
    if meta.key_rows is not None:
        k, v = k[meta.key_rows], v[meta.key_rows]
    dense = kind != "sdpa" and DENSE_WHEN_UNIFORM and not causal and meta.uniform and plain
    if dense and q.shape[-1] & (q.shape[-1] - 1):  # cuDNN's dense kernel beat the split head of the Triton kernel
        return _dense(q, k, v, meta.uniform, scale)  # by 13% at head dim 80 (attention-h200-2026-12-03.json)
    if kind == "torch_varlen" and plain and _triton_applies(q, k, v, causal):
        from po_batch.layers.triton_attention import triton_attention

        return triton_attention(q, k, v, meta.cu_q, meta.cu_k, meta.max_q, causal, scale)
    if dense:
        return _dense(q, k, v, meta.uniform, scale)
    span = (-1 if window is None else window - 1, 0 if causal else -1)  # keys (left, right) of each query
    if kind == "flash_attn":
        kw = {} if plain else {"window_size": span, "softcap": softcap or 0.0}
        return _flash_attn()(q, k, v, meta.cu_q, meta.cu_k, meta.max_q, meta.max_k, softmax_scale=scale,
                             causal=causal, **kw)
    if kind == "torch_varlen" and softcap is None:
        if k.shape[1] != q.shape[1] and not GQA_DIRECT:  # the benchmarks' A/B: K/V heads repeated
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        kw = {} if window is None else {"window_size_left": span[0], "window_size_right": span[1]}
        return torch.ops.aten._flash_attention_forward(q, k, v, meta.cu_q, meta.cu_k, meta.max_q, meta.max_k, 0.0,
                                                       causal, return_debug_mask=False, scale=scale, **kw)[0]
    return _sdpa(q, k, v, meta, causal, scale, softcap, window)


def _dense(q, k, v, length: int, scale: float | None = None) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = lambda t: t.view(-1, length, t.shape[1], t.shape[2]).transpose(1, 2)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH]):
        o = F.scaled_dot_product_attention(shape(q), shape(k), shape(v), scale=scale,
                                           enable_gqa=q.shape[1] != k.shape[1])
    return o.transpose(1, 2).reshape(q.shape)


def _sdpa(q, k, v, meta: Varlen, causal: bool, scale: float | None = None, softcap: float | None = None,
          window: int | None = None) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for qs, ks, vs, lq, lk in zip(q.split(meta.lens_q), k.split(meta.lens_k), v.split(meta.lens_k),
                                  meta.lens_q, meta.lens_k):
        qs, ks, vs = qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1)
        if softcap is not None:
            o = _capped(qs, ks, vs, _mask(lq, lk, causal, window, q.device), scale, softcap)
        else:
            # SDPA's own causal mask is top-left aligned: the bottom-right one is built where queries are not all keys
            mask = _mask(lq, lk, causal, window, q.device) if window is not None or (causal and lq != lk) else None
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal and mask is None,
                                               scale=scale, enable_gqa=gqa)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def _mask(lq: int, lk: int, causal: bool, window: int | None, device) -> torch.Tensor | None:
    """(lq, lk) bool, True where a query sees a key; the queries are the last lq of the lk positions."""
    if not causal and window is None:
        return None
    i = torch.arange(lk - lq, lk, device=device)[:, None]
    j = torch.arange(lk, device=device)
    seen = j <= i if causal else torch.ones(lq, lk, dtype=torch.bool, device=device)
    return seen if window is None else seen & (j > i - window)


def _capped(q, k, v, mask: torch.Tensor | None, scale: float | None, softcap: float) -> torch.Tensor:
    """(H, lq, D) attention with soft-capped scores, in transformers' eager order: scale, cap, mask, float32
    softmax."""
    if k.shape[0] != q.shape[0]:
        rep = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    s = torch.tanh(q @ k.transpose(1, 2) * (scale or q.shape[-1] ** -0.5) / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
