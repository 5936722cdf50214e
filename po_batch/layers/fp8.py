"""FP8 (e4m3) linear layers for `model.quantization: fp8`: each weight is quantized once at load with one scale
per output channel; each activation per token, inside the compiled graph around the matmul, where the
quantization fuses into the norm or activation that produces it. The matmul is torch._scaled_mm with rowwise
scales, accumulating in float32 and writing the model's dtype, bias included."""

import torch
from torch import nn

from po_batch.layers.linear import MergedLinear

E4M3_MAX = 448.0


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
        return self.part(x, 0, self.out_features)

    def part(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        q, s = quantize_rows(x.reshape(-1, x.shape[-1]))
        bias = None if self.bias is None else self.bias[lo:hi]
        y = torch._scaled_mm(q, self.weight[lo:hi].t(), scale_a=s, scale_b=self.scale[:, lo:hi].contiguous(),
                             bias=bias, out_dtype=x.dtype)
        return y.view(*x.shape[:-1], hi - lo)


def quantize_fp8(model: nn.Module, keep: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every linear layer of `model` by an Fp8Linear, except under the top-level modules named in `keep`;
    returns how many."""
    swaps = [(parent, name, child) for path, parent in model.named_modules() if path.split(".")[0] not in keep
             for name, child in parent.named_children()
             if isinstance(child, (nn.Linear, MergedLinear)) and name not in keep]
    for parent, name, child in swaps:
        setattr(parent, name, Fp8Linear(child))
    return len(swaps)
