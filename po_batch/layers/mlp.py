"""MLP variants: SwiGLU-style gated (language models, Qwen2.5-VL vision) and plain two-layer (Qwen2/3-VL vision)."""

import torch
import torch.nn.functional as F
from torch import nn

from po_batch.layers.fp8 import Fp8Linear
from po_batch.layers.linear import MergedLinear
from po_batch.layers.residual import add_projection

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedLinear(dim, [hidden, hidden], bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act, self.act_name = activation(act), act

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """With `residual` (the caller's own tensor), residual + the output, the down projection accumulating into
        it in place where layers/residual.py can."""
        h = self.gate_up_proj(x)
        if isinstance(self.down_proj, Fp8Linear) and self.down_proj.fuses(h):
            out = self.down_proj.after_activation(h, self.act_name, gated=True)
            return out if residual is None else residual + out
        gate, up = h.chunk(2, dim=-1)
        return add_projection(residual, self.down_proj, self.act(gate) * up)


# On CUDA, fc1's bias and a tanh GELU run in cuBLASLt's matmul epilogue instead of a separate pass over the
# hidden activations. A switch so that benchmarks can compare both.
GELU_EPILOGUE = True


class MLP(nn.Module):
    """fc2(act(fc1(x)))."""

    def __init__(self, dim: int, hidden: int, act: str, out: int | None = None, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out or dim, bias=bias)
        self.act, self.act_name = activation(act), act
        self.tanh_gelu = act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """With `residual`, residual + the output, as GatedMLP's."""
        if GELU_EPILOGUE and self.tanh_gelu and x.is_cuda and x.dim() == 2 and type(self.fc1) is nn.Linear \
                and self.fc1.bias is not None:
            h = torch._addmm_activation(self.fc1.bias, x, self.fc1.weight.t(), use_gelu=True)
            return add_projection(residual, self.fc2, h)
        h = self.fc1(x)
        if isinstance(self.fc2, Fp8Linear) and self.fc2.fuses(h):
            out = self.fc2.after_activation(h, self.act_name, gated=False)
            return out if residual is None else residual + out
        return add_projection(residual, self.fc2, self.act(h))
