"""FP8 (e4m3) linear layers for `model.quantization: fp8`: each weight is quantized once at load with one scale
per output channel; each activation per token, inside the compiled graph around the matmul: fused by inductor into
the norm that produces it, or, for an MLP's activation and an attention output, in a one-pass Triton kernel
(layers/triton_quant.py). The matmul is torch._scaled_mm with rowwise scales, accumulating in the tensor cores
(FAST_ACCUM) and writing the model's dtype, bias included (on the CPU, where the tests run, the same e4m3 values are
multiplied in float32)."""

import torch
import torch.nn.functional as F
from torch import nn

from po_batch.layers.linear import MergedLinear

E4M3_MAX = 448.0

# On CUDA, the activation before the second matmul of an MLP and its quantization run in one Triton kernel
# (layers/triton_quant.py) instead of inductor's fusion of the same ops, and so does the quantization of an
# attention output before its projection. A switch so that benchmarks can compare both.
TRITON_QUANT = True

# Hopper's fp8 tensor-core instructions accumulate in fewer bits than float32; by default the CUTLASS kernel behind
# torch._scaled_mm adds the partial sums into float32 registers every few instructions, which costs tensor-core
# time. With fast accumulation the sums stay in the tensor cores over the whole K loop: Qwen3-VL-2B fp8 +10.5% on an
# H200, and the products of the e4m3 values within 1.8-2.3e-3 of exact (K 1536-6144) against bf16 output's 1.7e-3
# without (bench_engine.py --no-fast-accum, tests/test_fp8.py).
FAST_ACCUM = True


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> e4m3 (M, K) and float32 scales (M, 1) with x ≈ q * scale, each row using the whole e4m3 range."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


class Fp8Linear(nn.Module):
    """Stands in for an nn.Linear (or MergedLinear) of the loaded model; same output, in the model's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = quantize_rows(linear.weight.data)
        self.register_buffer("weight", weight)         # (out, in) e4m3, row-major: its .t() is column-major
        self.register_buffer("scale", scale.view(1, -1))  # (1, out) float32
        self.bias = linear.bias
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s = quantize_rows(x.reshape(-1, x.shape[-1]))
        return self.matmul(q, s, x.shape[:-1], x.dtype)

    def part(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Output columns lo:hi, as the whole projection sliced: torch 2.11's inductor failed to lower _scaled_mm on
        the slices (Qwen2-VL's biased K/V of the last layer, on an H200); the extra columns are those of one layer."""
        return self(x)[..., lo:hi]

    def fuses(self, h: torch.Tensor) -> bool:
        """Whether after_activation runs its one-pass kernel on h."""
        return TRITON_QUANT and h.is_cuda

    def after_activation(self, h: torch.Tensor, act: str | None, gated: bool) -> torch.Tensor:
        """self(act(h)), or self(act(gate) * up) when gated (h = gate then up), quantized in the same pass."""
        from po_batch.layers.triton_quant import act_quant

        q, s = act_quant(h.reshape(-1, h.shape[-1]), act, gated)
        return self.matmul(q, s, h.shape[:-1], h.dtype)

    def matmul(self, q: torch.Tensor, s: torch.Tensor, lead: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        if q.is_cuda:
            y = torch._scaled_mm(q, self.weight.t(), scale_a=s, scale_b=self.scale, bias=self.bias, out_dtype=dtype,
                                  use_fast_accum=FAST_ACCUM)
        else:  # the same e4m3 values multiplied in float32 (torch 2.11's CPU _scaled_mm takes one scale per matrix)
            y = F.linear(q.float() * s, self.weight.float() * self.scale.t(),
                         None if self.bias is None else self.bias.float()).to(dtype)
        return y.view(*lead, self.out_features)


def project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x) for an input that no fused op of the graph produces (an attention output): an Fp8Linear quantizes
    it with the one-pass kernel, where inductor's kernel for a lone quantization is slower."""
    if isinstance(linear, Fp8Linear) and linear.fuses(x):
        return linear.after_activation(x, None, gated=False)
    return linear(x)


def quantize_fp8(model: nn.Module, keep: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every linear layer of `model` by an Fp8Linear, except under the top-level modules named in `keep`;
    returns how many."""
    swaps = [(parent, name, child) for path, parent in model.named_modules() if path.split(".")[0] not in keep
             for name, child in parent.named_children()
             if isinstance(child, (nn.Linear, MergedLinear)) and name not in keep]
    for parent, name, child in swaps:
        setattr(parent, name, Fp8Linear(child))
    return len(swaps)
