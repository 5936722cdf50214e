"""Variable-length attention over packed sequences: flash-attn's varlen kernel when installed, torch's
varlen kernel on CUDA otherwise, and SDPA one sequence at a time on the CPU. Each sequence sees only itself."""

import functools
import inspect

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
def _torch_varlen():
    """torch.nn.attention.varlen.varlen_attn and how to call it: its signature changed between torch releases
    (2.11 takes `is_causal` and equal head counts; 2.14 takes `window_size` and `enable_gqa`)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in params, "enable_gqa" in params


def backend(device: torch.device) -> str:
    if device.type != "cuda":
        return "sdpa"
    if _flash_attn() is not None:
        return "flash_attn"
    if _torch_varlen() is not None:
        return "torch_varlen"
    return "sdpa"


# Equal-length sequences (a batch of same-size images) take the dense batched path on CUDA, where cuDNN's
# Hopper attention kernel is faster than the varlen flash kernel. A switch so benchmarks can compare both.
DENSE_WHEN_UNIFORM = True
# Grouped-query attention goes straight to the flash kernel under torch's varlen_attn, which reads the shared K/V
# heads itself; torch 2.11's wrapper accepts only equal head counts, and repeating K/V costs two copies a layer.
# A switch so benchmarks can compare both.
GQA_DIRECT = True


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Varlen, causal: bool) -> torch.Tensor:
    """q: (Tq, Hq, D), k/v: (Tk, Hkv, D) -> (Tq, Hq, D). Causal masks align to the end of each key sequence,
    so a sequence whose queries are only its last positions (or whose keys begin with a shared prefix's) sees all
    of its keys up to each query."""
    if meta.key_rows is not None:
        k, v = k[meta.key_rows], v[meta.key_rows]
    kind = backend(q.device)
    if kind != "sdpa" and DENSE_WHEN_UNIFORM and not causal and meta.uniform:
        return _dense(q, k, v, meta.uniform)
    if kind == "flash_attn":
        return _flash_attn()(q, k, v, meta.cu_q, meta.cu_k, meta.max_q, meta.max_k, causal=causal)
    if kind == "torch_varlen":
        fn, has_window, has_gqa = _torch_varlen()
        kw = {}
        if k.shape[1] != q.shape[1] and GQA_DIRECT:
            return torch.ops.aten._flash_attention_forward(q, k, v, meta.cu_q, meta.cu_k, meta.max_q, meta.max_k,
                                                           0.0, causal, return_debug_mask=False)[0]
        if k.shape[1] != q.shape[1]:
            if has_gqa:
                kw["enable_gqa"] = True
            else:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if has_window:
            kw["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kw["is_causal"] = causal
        return fn(q, k, v, meta.cu_q, meta.cu_k, meta.max_q, meta.max_k, **kw)
    return _sdpa(q, k, v, meta, causal)


def _dense(q, k, v, length: int) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = lambda t: t.view(-1, length, t.shape[1], t.shape[2]).transpose(1, 2)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH]):
        o = F.scaled_dot_product_attention(shape(q), shape(k), shape(v), enable_gqa=q.shape[1] != k.shape[1])
    return o.transpose(1, 2).reshape(q.shape)


def _sdpa(q, k, v, meta: Varlen, causal: bool) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for qs, ks, vs, lq, lk in zip(q.split(meta.lens_q), k.split(meta.lens_k), v.split(meta.lens_k),
                                  meta.lens_q, meta.lens_k):
        mask = None
        if causal and lq != lk:  # bottom-right aligned causal mask
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        o = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
                                           attn_mask=mask, is_causal=causal and lq == lk, enable_gqa=gqa)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)
