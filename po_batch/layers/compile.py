"""Optional fusion of the elementwise work around each matmul with torch.compile (CUDA only).

Layers call `FUSED.call(self.method, ...)`: eager when fusion is off; otherwise one compiled graph per method,
shared by every layer of the same class (modules are inputs to the graph), with dynamic token counts.

Inductor's multi-kernel reductions are on: a reduction over rows up to 16384 wide (the norms over 1536-2048, the
fp8 quantization of 3072-6144-wide activations) gets a persistent, one-pass variant beside the looped one, which
reads its row twice, and the faster of the two is picked by timing at the first call. On an H200 (torch 2.11):
Qwen3-0.6B +9.4% and +2.0% in two runs, Qwen2-VL-2B +3.0%, Qwen3-VL-2B +0.4% in bf16 and +3.5% in fp8, Gemma-2B
-0.3% (bench/results/engine-h200-2026-12-02-multi-kernel.json, -multi-kernel-default.json). Like inductor's own autotuning of a kernel's block
sizes, the pick is by timing, so two processes may sum a row in different orders (bf16 rounding apart)."""

import os

import torch

MULTI_KERNEL = True  # a switch so that benchmarks can compare both


class Fusion:
    def __init__(self):
        self.enabled = False
        self.compiled = {}

    def enable(self, on: bool) -> None:
        if on:
            import torch._dynamo
            import torch._inductor.config

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            torch._inductor.config.triton.multi_kernel = int(MULTI_KERNEL)
            # the pick of a multi-kernel is timed again in each process rather than read from inductor's file
            # beside its cache: under torch 2.11 every second process on a machine (a rerun, the next array task)
            # failed there in Triton, the kernel's JITFunction back from the cache without its lock
            # (tests/test_compile.py)
            os.environ.setdefault("TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE", "1")
        self.enabled = on

    def call(self, method, *args):
        if not self.enabled:
            return method(*args)
        fn = method.__func__
        if fn not in self.compiled:
            self.compiled[fn] = torch.compile(fn, dynamic=True)
        return self.compiled[fn](method.__self__, *args)


FUSED = Fusion()
