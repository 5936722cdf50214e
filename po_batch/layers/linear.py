"""Linear layers that fuse several checkpoint tensors into one matmul (q/k/v -> qkv, gate/up -> gate_up).

A fused layer's `load_shard(param, tensor, shard)` copies one checkpoint tensor into its slice; the model
declares which checkpoint names map to which shard (see models/loader.py)."""

import torch
import torch.nn.functional as F
from torch import nn


class MergedLinear(nn.Linear):
    """One matmul whose output is the concatenation of several projections of the same input."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(out_sizes), bias=bias)
        self.out_sizes = out_sizes

    def load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard: int) -> None:
        start = sum(self.out_sizes[:shard])
        dst = param.data.narrow(0, start, self.out_sizes[shard])
        if dst.shape != tensor.shape:
            raise ValueError(f"expected shape {tuple(dst.shape)}, checkpoint has {tuple(tensor.shape)}")
        dst.copy_(tensor)

    def part(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Output columns lo:hi alone (the last layer's queries at the read rows, its keys and values at all)."""
        return F.linear(x, self.weight[lo:hi], None if self.bias is None else self.bias[lo:hi])
