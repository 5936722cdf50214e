"""model.quantization: fp8 on the CPU (torch._scaled_mm's rowwise path exists there too): the quantization is
within e4m3's rounding, every linear layer but the readout is replaced, and the scores stay close to the model's
dtype; on a GPU the same code runs in bf16 (scripts/bench_engine.py measures it)."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from rich.console import Console
from torch import nn

from po_batch.config import config_from_dict
from po_batch.layers import fp8 as fp8_layers
from po_batch.layers.fp8 import Fp8Linear, quantize_rows
from po_batch.layers.mlp import MLP, GatedMLP, activation
from po_batch.spec import open_spec
from po_batch.tiny import build_checkpoint
from po_batch.verify import verify


def test_quantized_rows_are_within_e4m3_rounding():
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different magnitudes
    q, s = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 1)
    back = q.float() * s
    # 3 mantissa bits: relative error at most 2^-4 for normal values; tiny ones (near 2^-9 of the row's max)
    # fall into e4m3's subnormals, with an absolute error of a subnormal step
    err = (back - x).abs()
    assert (err <= x.abs() / 16 + s * 2.0 ** -9).all()
    assert q.float().abs().amax(1).eq(448).all()  # every row uses the whole range


def test_fp8_linear_matches_the_linear_within_rounding():
    torch.manual_seed(0)
    lin = nn.Linear(128, 96)
    x = torch.randn(40, 128)
    fp8 = Fp8Linear(lin)
    want = lin(x)
    got = fp8(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).norm() / want.norm() < 0.05
    assert torch.allclose(fp8.part(x, 10, 50), got[:, 10:50])


def test_every_mlp_activation_has_its_one_pass_kernel_code():
    from po_batch.layers.mlp import ACTIVATIONS
    from po_batch.layers.triton_quant import ACTS

    assert set(ACTIVATIONS) | {None} == set(ACTS) and len(set(ACTS.values())) == len(ACTS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a Triton kernel: CUDA only")
@pytest.mark.parametrize("act,gated", [("silu", True), ("gelu_pytorch_tanh", True), ("gelu_pytorch_tanh", False),
                                       ("gelu", False), ("quick_gelu", False), (None, False)])
def test_the_one_pass_activation_quantization_matches_the_ops_it_replaces_eager_and_compiled(act, gated):
    from po_batch.layers import triton_quant
    from po_batch.layers.triton_quant import act_quant

    torch.manual_seed(0)
    n = 2500  # not a power of two: the whole-row kernel's block is masked, the chunked kernel's last chunk too
    x = (torch.randn(300, 2 * n if gated else n, device="cuda") * torch.logspace(-2, 1, 300, device="cuda")[:, None]
         ).bfloat16()
    h = x if act is None else activation(act)(x[:, :n]) * x[:, n:] if gated else activation(act)(x)
    want_q, want_s = quantize_rows(h)
    q, s = act_quant(x, act, gated, chunked=False)
    assert q.shape == (300, n) and q.dtype == torch.float8_e4m3fn and s.shape == (300, 1)
    assert torch.allclose(s, want_s, rtol=1e-2)
    back, want = q.float() * s, want_q.float() * want_s
    # the kernel rounds act(gate) * up to bf16 once, eager rounds act(gate) first: an e4m3 step apart, rarely, and
    # a row's maximum a bf16 step apart (its scale 2^-7 apart)
    assert ((back - want).abs() <= want.abs() * (1 / 8 + 2.0 ** -6) + want_s * 2.0 ** -8).all()
    assert (q.float() == want_q.float()).float().mean() > 0.97
    if act is None:  # nothing rounded apart: the same e4m3 values
        assert torch.equal(q.float(), want_q.float())
    cq, cs = act_quant(x, act, gated, chunked=True)
    assert torch.equal(cq.float(), q.float()) and torch.equal(cs, s)
    triton_quant.FMA_DIVISION = False  # IEEE division: the reciprocal and its correction give the same quotients
    try:
        for chunked in (False, True):
            dq, ds = act_quant(x, act, gated, chunked=chunked)
            assert torch.equal(dq.float(), q.float()) and torch.equal(ds, s)
    finally:
        triton_quant.FMA_DIVISION = True
    cq, cs = torch.compile(act_quant, dynamic=True)(x[:211], act, gated)  # inside a graph, another row count
    assert torch.equal(cq.float(), q[:211].float()) and torch.equal(cs, s[:211])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._scaled_mm's CUDA kernels")
@pytest.mark.parametrize("k", [1536, 6144])  # a decoder's hidden size; an MLP's width (Qwen3-VL-2B's down_proj)
def test_fast_accumulation_stays_close_to_the_exact_product_of_the_e4m3_values(k):
    # the tensor cores' own accumulation over the whole K loop (layers/fp8.py FAST_ACCUM) against the float64
    # product of the same quantized values; without it the float32 sums are exact to the bf16 output's rounding
    torch.manual_seed(0)
    lin = nn.Linear(k, 512, bias=False).cuda().bfloat16()
    fp8 = Fp8Linear(lin)
    x = torch.randn(1024, k, device="cuda", dtype=torch.bfloat16)
    q, s = quantize_rows(x)
    exact = (q.double() * s.double()) @ (fp8.weight.double() * fp8.scale.double().t()).t()
    errors = {}
    for fast in (True, False):
        fp8_layers.FAST_ACCUM = fast
        try:
            got = fp8.matmul(q, s, x.shape[:-1], x.dtype).double()
        finally:
            fp8_layers.FAST_ACCUM = True
        errors[fast] = ((got - exact).norm() / exact.norm()).item()
    print(f"K={k}: relative error with fast accumulation {errors[True]:.2e}, without {errors[False]:.2e}")
    # on an H200 (torch 2.11): 1.8e-3 (K 1536) and 2.3e-3 (K 6144) with it, 1.7e-3 without
    assert errors[False] < 3e-3 and errors[True] < 5e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a Triton kernel: CUDA only")
@pytest.mark.parametrize("gated", [True, False])
def test_an_fp8_mlp_on_cuda_takes_the_one_pass_kernel_and_equals_inductor_s_fusion_within_rounding(gated):
    torch.manual_seed(0)
    mlp = (GatedMLP(256, 704, "silu") if gated else MLP(256, 704, "quick_gelu")).cuda().bfloat16()
    for name in ("down_proj", "gate_up_proj") if gated else ("fc1", "fc2"):
        setattr(mlp, name, Fp8Linear(getattr(mlp, name)))
    x = torch.randn(77, 256, device="cuda", dtype=torch.bfloat16)
    assert mlp.down_proj.fuses(x) if gated else mlp.fc2.fuses(x)
    with torch.inference_mode():  # as the engine runs (_scaled_mm has no derivative)
        got = torch.compile(mlp.forward, dynamic=True)(x)
        fp8_layers.TRITON_QUANT = False
        try:
            want = mlp(x)
        finally:
            fp8_layers.TRITON_QUANT = True
    assert got.shape == want.shape and ((got - want).float().norm() / want.float().norm()) < 0.02


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64 + 8 * seed, 96, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    ckpt = build_checkpoint(root / "model", "qwen3_vl")
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(8)], "category": ["cat", "dog"] * 4,
                             "image": pa.array([png(i) for i in range(8)], pa.binary())}), root / "data.parquet")
    return ckpt, root


def cfg_for(corpus, quantization: str):
    ckpt, root = corpus
    return config_from_dict({"model": {"path": str(ckpt), "device": "cpu", "quantization": quantization},
                             "input": {"paths": [str(root / "data.parquet")], "columns": ["category"]},
                             "task": {"prompt": "Is there a {category} in this image? Answer yes or no."},
                             "output": {"path": str(root / "out")}, "run": {"workers": 0}})


def test_fp8_engine_replaces_every_linear_but_the_readout_and_stays_close(corpus):
    ckpt, root = corpus
    rows = [(png(i), {"id": f"r{i}", "category": "cat"}) for i in range(8)]
    base_spec, fp8_spec = open_spec(cfg_for(corpus, "none"), "cpu", "float32", 0), \
        open_spec(cfg_for(corpus, "fp8"), "cpu", "float32", 0)
    assert base_spec.fingerprint()["model.quantization"] == "none" != fp8_spec.fingerprint()["model.quantization"]
    base, fp8 = base_spec.load_engine(), fp8_spec.load_engine()
    linears = [m for m in fp8.model.modules() if isinstance(m, nn.Linear)]
    assert linears == [] and sum(isinstance(m, Fp8Linear) for m in fp8.model.modules()) > 20
    want = base.score([base_spec.prep(r) for r in rows])[:, 0]
    got = fp8.score([fp8_spec.prep(r) for r in rows])[:, 0]
    assert np.abs(want).max() > 0.05 and not np.allclose(got, want, atol=1e-6)  # it really runs in fp8
    p = lambda z: 1 / (1 + np.exp(z[:, 1] - z[:, 0]))  # noqa: E731
    assert np.abs(p(got) - p(want)).max() < 0.1
    clear = np.abs(want[:, 0] - want[:, 1]) > 0.5
    assert ((got[clear, 0] > got[clear, 1]) == (want[clear, 0] > want[clear, 1])).all()


def test_verify_states_the_fp8_tolerance(corpus):
    console = Console(file=io.StringIO(), width=200)
    assert verify(cfg_for(corpus, "fp8"), 8, "cpu", "float32", console) == 0
    text = console.file.getvalue()
    assert "po-batch fp8 vs transformers" in text and "prob 0.15" in text
