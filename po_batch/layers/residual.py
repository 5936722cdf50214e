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


# Registered through the low-level library API: the dispatcher calls the kernel directly, where
# torch.library.custom_op wraps it in Python checks that cost the host more per call than the copy saved when the
# host bounds a workload (Qwen3-0.6B at 16384 tokens on an H200's host).
_LIB = torch.library.Library("po_batch", "FRAGMENT")
_LIB.define("add_matmul_(Tensor(a!) x, Tensor h, Tensor weight) -> ()")


def _add_matmul_(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> None:
    x.addmm_(h, weight.t())


_LIB.impl("add_matmul_", _add_matmul_, "CompositeExplicitAutograd")
torch.library.register_fake("po_batch::add_matmul_", lambda x, h, weight: None, lib=_LIB)


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
