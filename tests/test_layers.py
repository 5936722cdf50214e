"""Shared layers against plain references: varlen attention (causal, last-position queries, GQA, the dense path
for equal lengths; Gemma2's score scale, soft-cap and sliding window) and M-RoPE frequency layouts."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from po_batch.layers.attention import _dense, varlen_attention
from po_batch.layers.context import Varlen
from po_batch.layers.rotary import mrope_axes


def reference(q, k, v, lens, causal, scale=None, softcap=None, window=None):
    """Per sequence, in transformers' eager order: scale, soft-cap, then the (causal, sliding-window) mask."""
    outs, start = [], 0
    for n in lens:
        s = slice(start, start + n)
        rep = q.shape[1] // k.shape[1]
        kk, vv = k[s].repeat_interleave(rep, 1), v[s].repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", q[s], kk) * (scale or q.shape[-1] ** -0.5)
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        seen = torch.ones(n, n, dtype=torch.bool)
        if causal:
            seen = seen.tril()
        if window:
            seen = seen & ~torch.ones(n, n, dtype=torch.bool).tril(-window)  # key j needs j > i - window
        outs.append(torch.einsum("hqk,khd->qhd", scores.masked_fill(~seen, float("-inf")).softmax(-1), vv))
        start += n
    return torch.cat(outs)


def test_varlen_attention_sees_only_its_own_sequence_with_gqa_and_causal_mask():
    torch.manual_seed(0)
    lens = [5, 1, 9, 3]
    q, k, v = torch.randn(18, 6, 8), torch.randn(18, 2, 8), torch.randn(18, 2, 8)
    for causal in (False, True):
        got = varlen_attention(q, k, v, Varlen.from_lens(lens, "cpu"), causal)
        assert torch.allclose(got, reference(q, k, v, lens, causal), atol=1e-5)


def test_last_position_queries_see_all_keys_of_their_sequence():
    torch.manual_seed(1)
    lens = [5, 1, 9, 3]
    q, k, v = torch.randn(18, 4, 8), torch.randn(18, 4, 8), torch.randn(18, 4, 8)
    full = reference(q, k, v, lens, causal=True)
    last = torch.tensor([4, 5, 14, 17])
    got = varlen_attention(q[last], k, v, Varlen.from_lens(lens, "cpu", [1] * 4), causal=True)
    assert torch.allclose(got, full[last], atol=1e-5)


# On a CUDA machine the same checks run through the kernels (flash-attn or torch's varlen, in bfloat16: they take
# half precision only) and their fallback.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_heads", [2, 6])
@pytest.mark.parametrize("scale,softcap,window", [(0.3, None, None), (None, None, 4), (0.3, 1.5, None),
                                                  (0.3, 1.5, 4)])
def test_scale_soft_cap_and_sliding_window_match_eager_math(device, kv_heads, scale, softcap, window):
    """Gemma2's attention: the score scale, the soft-cap before the mask, a window shorter than most sequences;
    over whole sequences and from their last positions alone (keys gathered through key_rows, as a shared prefix
    does), with grouped and with equal K/V heads."""
    torch.manual_seed(3)
    lens = [5, 1, 9, 3, 12]
    q, k, v = torch.randn(30, 6, 8) * 2, torch.randn(30, kv_heads, 8) * 2, torch.randn(30, kv_heads, 8)
    want = reference(q, k, v, lens, True, scale, softcap, window)
    if softcap:  # the cap changes the result: the check would see a backend that drops it
        assert (want - reference(q, k, v, lens, True, scale, None, window)).abs().max() > 1
    if window:
        assert (want - reference(q, k, v, lens, True, scale, softcap, None)).abs().max() > 1
    dtype, tol = (torch.float32, 1e-5) if device == "cpu" else (torch.bfloat16, 3e-2)
    dev = lambda t: t.to(device, dtype)  # noqa: E731
    got = varlen_attention(dev(q), dev(k), dev(v), Varlen.from_lens(lens, device), True, scale, softcap, window)
    assert torch.allclose(got.float().cpu(), want, atol=tol)
    last = torch.tensor([4, 5, 14, 17, 29])
    reverse = torch.arange(29, -1, -1).to(device)  # keys stored in reverse, gathered back into order
    meta = Varlen.from_lens(lens, device, [1] * 5, key_rows=reverse)
    got = varlen_attention(dev(q[last]), dev(k.flip(0)), dev(v.flip(0)), meta, True, scale, softcap, window)
    assert torch.allclose(got.float().cpu(), want[last], atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a Triton kernel: CUDA only")
@pytest.mark.parametrize("kv_heads,dim", [(2, 128), (8, 128), (4, 64)])
def test_the_triton_causal_kernel_matches_eager_math_whole_and_from_last_positions(kv_heads, dim):
    """Sequences shorter and longer than its blocks (1 to 300), grouped K/V heads, and the last layer's queries
    (each sequence's last position only, its keys gathered through key_rows)."""
    from po_batch.layers import attention

    torch.manual_seed(4)
    lens = [1, 17, 64, 65, 128, 129, 300, 5]
    t = sum(lens)
    q, k, v = torch.randn(t, 8, dim), torch.randn(t, kv_heads, dim), torch.randn(t, kv_heads, dim)
    want = reference(q, k, v, lens, True)
    dev = lambda x: x.to("cuda", torch.bfloat16)  # noqa: E731
    assert attention._triton_applies(dev(q), dev(k), dev(v))
    got = varlen_attention(dev(q), dev(k), dev(v), Varlen.from_lens(lens, "cuda"), True)
    assert torch.allclose(got.float().cpu(), want, atol=3e-2)
    last = torch.tensor(np.cumsum(lens) - 1)
    reverse = torch.arange(t - 1, -1, -1).to("cuda")
    meta = Varlen.from_lens(lens, "cuda", [1] * len(lens), key_rows=reverse)
    got = varlen_attention(dev(q[last]), dev(k.flip(0)), dev(v.flip(0)), meta, True)
    assert torch.allclose(got.float().cpu(), want[last], atol=3e-2)
    attention.TRITON_CAUSAL = False  # the flash kernel on the same inputs: the two agree
    try:
        flash = varlen_attention(dev(q), dev(k), dev(v), Varlen.from_lens(lens, "cuda"), True)
    finally:
        attention.TRITON_CAUSAL = True
    got = varlen_attention(dev(q), dev(k), dev(v), Varlen.from_lens(lens, "cuda"), True)
    assert (got.float() - flash.float()).abs().max() < 3e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a Triton kernel: CUDA only")
@pytest.mark.parametrize("shared", [8, 64, 130])
def test_the_triton_kernel_reads_a_batch_s_shared_prefix_in_place_as_the_gathered_keys_say(shared, monkeypatch):
    """A batch whose samples begin with the same rows (engine/batch.py): the kernel reads the prefix's keys where
    they are (Varlen.ranges) and gets what the gathered keys give, whole sequences and the last layer's rows."""
    import dataclasses

    from po_batch.engine.batch import make_batch
    from po_batch.layers import attention
    from po_batch.sample import Sample

    torch.manual_seed(7)
    common = list(range(1000, 1000 + shared))
    samples = []
    for n in [1, 17, 64, 65, 200, 5]:
        ids = np.array(common + list(range(n + 1)), dtype=np.int32)
        samples.append(Sample(input_ids=ids, positions=np.arange(len(ids), dtype=np.int32)[None],
                              segments=np.array([[len(ids), -1, 1]], dtype=np.int32),
                              targets=np.array([-1], dtype=np.int32)))
    monkeypatch.setattr(attention, "PREFIX_IN_PLACE", True)  # the batch carries the ranges for the kernel
    batch = make_batch(samples, None, torch.device("cuda"))
    ctx = batch.context
    assert ctx.text.ranges is not None and ctx.text.lens_q[0] == shared
    t = sum(ctx.text.lens_q)
    q, k, v = (torch.randn(t, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k, v = k[:, :8], v[:, :8]  # grouped heads, strided as a projection's slice would be
    for meta, qs in ((ctx.text, q), (ctx.reads, q[batch.reads])):
        got = varlen_attention(qs, k, v, meta, True)
        gathered = varlen_attention(qs, k, v, dataclasses.replace(meta, ranges=None), True)
        want = varlen_attention(qs.float().cpu(), k.float().cpu(), v.float().cpu(),
                                dataclasses.replace(meta, ranges=None, key_rows=meta.key_rows.cpu()), True)
        assert (got.float() - gathered.float()).abs().max() < 3e-2
        assert (got.float().cpu() - want).abs().max() < 3e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a Triton kernel: CUDA only")
@pytest.mark.parametrize("dim", [64, 80, 128])
@pytest.mark.parametrize("lens", [[196, 196, 196], [1, 17, 64, 65, 300, 784, 129]])
def test_the_triton_kernel_s_full_attention_matches_eager_math_and_torch_s_kernels(dim, lens):
    """The vision towers' attention: same-size images (which cuDNN's dense kernel took before, and still takes at
    head dim 80) and mixed sizes (torch's flash kernel before), head dims 64 (Qwen3-VL), 80 (Qwen2-VL, Qwen2.5-VL:
    64 + a 16-wide tail) and 128."""
    from po_batch.layers import attention

    torch.manual_seed(6)
    t = sum(lens)
    q, k, v = torch.randn(t, 16, dim), torch.randn(t, 16, dim), torch.randn(t, 16, dim)
    want = reference(q, k, v, lens, False)
    dev = lambda x: x.to("cuda", torch.bfloat16)  # noqa: E731
    assert attention._triton_applies(dev(q), dev(k), dev(v), causal=False)
    got = varlen_attention(dev(q), dev(k), dev(v), Varlen.from_lens(lens, "cuda"), False)
    assert torch.allclose(got.float().cpu(), want, atol=3e-2)
    attention.TRITON_FULL = False
    try:
        theirs = varlen_attention(dev(q), dev(k), dev(v), Varlen.from_lens(lens, "cuda"), False)
    finally:
        attention.TRITON_FULL = True
    assert (got.float() - theirs.float()).abs().max() < 3e-2


INTERPRETED = """
import sys
import numpy as np
import torch
import triton
from po_batch.layers import triton_attention
from test_layers import reference

torch.manual_seed(5)
worst = 0.0
for kv_heads, dim, causal in [(2, 16, True), (8, 16, True), (4, 32, True), (8, 16, False), (2, 48, False),
                              (4, 48, True)]:
    lens = [1, 17, 40, 33, 3]
    t = sum(lens)
    q, k, v = torch.randn(t, 8, dim), torch.randn(t, kv_heads, dim), torch.randn(t, kv_heads, dim)
    want = reference(q, k, v, lens, causal)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    last = torch.tensor(np.cumsum(lens) - 1)
    head, tail = triton_attention.split_head(dim)
    ones = torch.arange(len(lens) + 1, dtype=torch.int32)
    cases = [(q, k, v, cu, max(lens), want, None)]
    if causal:  # the last layer's queries: each sequence's last position against all its keys
        cases.append((q[last].contiguous(), k, v, ones, 1, want[last], None))
        # a prefix of 21 rows before the sequences that each sees first, its keys read in place (RANGES)
        pq, pk, pv = torch.randn(21, 8, dim), torch.randn(21, kv_heads, dim), torch.randn(21, kv_heads, dim)
        bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
        ref = torch.cat([reference(torch.cat([pq, q[a:b]]), torch.cat([pk, k[a:b]]), torch.cat([pv, v[a:b]]),
                                   [21 + b - a], True)[21:] for a, b in bounds])
        ranges = torch.tensor([[21 + a, 21 + b, 0, 21] for a, b in bounds], dtype=torch.int32)
        k2, v2 = torch.cat([pk, k]), torch.cat([pv, v])
        cases += [(q, k2, v2, cu, max(lens), ref, ranges), (q[last].contiguous(), k2, v2, ones, 1, ref[last], ranges)]
    for qs, ks, vs, cu_q, max_q, ref, ranges in cases:
        out = torch.empty_like(qs)
        grid = (triton.cdiv(max_q, 16), len(lens), 8)
        triton_attention._attention_fwd.fn[grid](
            qs, ks, vs, out, cu_q, cu, cu if ranges is None else ranges, dim ** -0.5, qs.stride(0), qs.stride(1),
            ks.stride(0), ks.stride(1), vs.stride(0), vs.stride(1), out.stride(0), out.stride(1), 1, HEAD=head,
            TAIL=tail, GROUP=8 // kv_heads, CAUSAL=causal, RANGES=ranges is not None, BLOCK_M=16, BLOCK_N=16)
        worst = max(worst, float((out - ref).abs().max()))
print(worst)
"""


def interpreter_takes_loaded_loop_bounds() -> bool:
    """Triton's interpreter holds a loaded scalar as a 1-element array; before 3.8 its __index__ is
    int(array), which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted"), so a kernel's loop over
    a bound read from memory fails there (Triton 3.6, beside torch 2.11, on the GPU machine); 3.8 squeezes it."""
    import inspect

    from triton.runtime import interpreter

    return "squeeze" in inspect.getsource(interpreter) or np.lib.NumpyVersion(np.__version__) < "2.4.0"


def test_the_triton_attention_kernel_run_by_triton_s_interpreter_matches_eager_math():
    """The kernel's own code on the CPU, through TRITON_INTERPRET (float32, small blocks: 16 queries by 16 keys,
    so that sequences of 1 to 40 cross them): causal over whole sequences and from last positions, with and without
    a shared prefix read in place (RANGES), full attention, grouped and equal K/V heads, and a head dim split into a
    power of two and a tail (48 = 32 + 16)."""
    pytest.importorskip("triton")
    if not interpreter_takes_loaded_loop_bounds():
        pytest.skip("this Triton's interpreter cannot run a loop over a loaded bound under NumPy >= 2.4 (the "
                    "compiled kernel is tested on a GPU, above)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).parent)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.split()[-1]) < 1e-5, res.stdout


def test_dense_path_for_equal_lengths_matches_varlen():
    torch.manual_seed(2)
    meta = Varlen.from_lens([7, 7, 7], "cpu")
    assert meta.uniform == 7 and Varlen.from_lens([7, 6], "cpu").uniform is None
    q, k, v = torch.randn(21, 4, 16), torch.randn(21, 4, 16), torch.randn(21, 4, 16)
    assert torch.allclose(_dense(q, k, v, 7), reference(q, k, v, [7, 7, 7], False), atol=1e-5)


def test_mrope_axes_sectioned_and_interleaved():
    assert mrope_axes(16, [2, 3, 3], False).tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    # Qwen3-VL: t h w t h w ..., h and w limited to their sections, the rest t
    assert mrope_axes(16, [4, 2, 2], True).tolist() == [0, 1, 2, 0, 1, 2, 0, 0]
