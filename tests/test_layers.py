"""Shared layers against plain references: varlen attention (causal, last-position queries, GQA, the dense path
for equal lengths) and M-RoPE frequency layouts."""

import torch
import torch.nn.functional as F

from po_batch.layers.attention import _dense, varlen_attention
from po_batch.layers.context import Varlen
from po_batch.layers.rotary import mrope_axes


def reference(q, k, v, lens, causal):
    outs, start = [], 0
    for n in lens:
        s = slice(start, start + n)
        rep = q.shape[1] // k.shape[1]
        kk, vv = k[s].repeat_interleave(rep, 1), v[s].repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", q[s], kk) / q.shape[-1] ** 0.5
        if causal:
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv))
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
