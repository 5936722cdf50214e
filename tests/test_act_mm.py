"""The MLP's activation inside its second matmul (layers/triton_act_mm.py): on the CPU through Triton's interpreter
(float16: the interpreter has no bfloat16), against the activation rounded to the model's dtype and a float32
matmul; on a GPU, the engine's MLPs with the kernel against the separate activation and cuBLAS, in bfloat16."""

import os
import subprocess
import sys

import pytest
import torch

from po_batch.layers import mlp as mlp_layers
from po_batch.layers.mlp import MLP, GatedMLP

CASES = [("silu", True, False, True, 70, 96, 48), ("quick_gelu", False, True, True, 50, 100, 40),
         ("silu", True, True, False, 33, 64, 64), ("gelu_pytorch_tanh", False, False, False, 40, 80, 72),
         ("gelu", False, False, True, 9, 32, 40)]

INTERPRETED = """
import torch, triton
from po_batch.layers import triton_act_mm
from po_batch.layers.mlp import activation
triton_act_mm._act_matmul.configs = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2})]
torch.manual_seed(0)
for act, gated, bias, res, m, k, n in %r:
    h = torch.randn(m, 2 * k if gated else k).half()
    w = (torch.randn(n, k) / k ** .5).half()
    b = torch.randn(n).half() if bias else None
    r = torch.randn(m, n).half() if res else None
    a = (activation(act)(h[:, :k].float()) * h[:, k:].float() if gated else activation(act)(h.float())).half()
    want = a.float() @ w.float().T + (b.float() if bias else 0) + (r.float() if res else 0)
    into = None if r is None else r.clone()
    got = triton_act_mm.act_matmul(h, w, b, act, gated, into)
    assert got.shape == (m, n) and got.dtype == torch.float16, (act, got.shape, got.dtype)
    assert into is None or got is into  # the residual accumulated in place
    err = (got.float() - want).abs()
    assert (err <= want.abs() * 2.0 ** -10 + 1e-4).all(), (act, gated, bias, res, err.max().item())
print("ok")
"""


def test_the_kernel_matches_the_activation_then_the_matmul_in_triton_s_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", INTERPRETED % (CASES,)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a Triton kernel: CUDA only")
@pytest.mark.parametrize("gated,act,bias", [(True, "silu", False), (False, "quick_gelu", True), (True, "silu", True)])
def test_the_mlps_with_the_kernel_match_the_separate_activation_in_bfloat16(gated, act, bias):
    torch.manual_seed(0)
    width, hidden = 256, 3420 if bias else 1024  # Qwen2.5-VL's 3420: K is no multiple of the kernel's block
    m = (GatedMLP(width, hidden, act, bias=bias) if gated else MLP(width, hidden, act, bias=bias)).cuda().bfloat16()
    x = torch.randn(1000, width, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(1000, width, device="cuda", dtype=torch.bfloat16)
    try:
        with torch.no_grad():
            mlp_layers.ACT_MATMUL = False
            want = m(x, residual=r.clone()).float()
            mlp_layers.ACT_MATMUL = True
            into = r.clone()
            got = m(x, residual=into)
            plain = m(x).float()
    finally:
        mlp_layers.ACT_MATMUL = True
    assert got is into
    scale = want.abs().max()
    assert (got.float() - want).abs().max() <= scale * 2.0 ** -7  # a bf16 rounding or two of the result apart
    assert (plain - (want - r.float())).abs().max() <= scale * 2.0 ** -6
