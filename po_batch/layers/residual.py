"""A residual add of a projection, x + linear(h), with the matmul accumulating into x in place.

Out of place, torch's addmm first copies x into the result (a device-to-device copy of the residual stream, twice a
decoder layer) and then adds it in cuBLAS's epilogue anyway; a biased projection (the vision towers' fc2) wrote its
output and a separate kernel added it to x. In place the matmul's epilogue reads x and writes the sum over it. A
custom op, so that a compiled graph keeps the mutation of its input x as it is rather than copying x."""

import torch
from torch import nn

from po_batch.layers.fp8 import project

# A switch so that benchmarks can compare both.
IN_PLACE = True


@torch.library.custom_op("po_batch::add_matmul_", mutates_args=("x",))
def _add_matmul_(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> None:
    x.addmm_(h, weight.t())


@_add_matmul_.register_fake
def _(x, h, weight) -> None:
    return None


def add_projection(x: torch.Tensor | None, linear: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """x + linear(h) for h (M, K) and x (M, N), the caller's own tensor, which it may overwrite; linear(h) when x is
    None. For a plain layer in x's dtype the matmul accumulates in place: into x itself, or, with a bias, into
    x + bias (a pointwise op that the compiled graph fuses into the kernel that produced x). An fp8 layer adds out of
    place."""
    if x is None:
        return project(linear, h)
    if IN_PLACE and type(linear) is nn.Linear and x.dtype == h.dtype == linear.weight.dtype and x.is_contiguous() \
            and h.dim() == 2 and not torch.is_grad_enabled():
        base = x if linear.bias is None else x + linear.bias
        torch.ops.po_batch.add_matmul_(base, h, linear.weight)
        return base
    return x + project(linear, h)
