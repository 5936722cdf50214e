"""Optional fusion of the elementwise work around each matmul with torch.compile (CUDA only).

Layers call `FUSED.call(self.method, ...)`: eager when fusion is off; otherwise one compiled graph per method,
shared by every layer of the same class (modules are inputs to the graph), with dynamic token counts."""

import torch


class Fusion:
    def __init__(self):
        self.enabled = False
        self.compiled = {}

    def enable(self, on: bool) -> None:
        if on:
            import torch._dynamo

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.enabled = on

    def call(self, method, *args):
        if not self.enabled:
            return method(*args)
        fn = method.__func__
        if fn not in self.compiled:
            self.compiled[fn] = torch.compile(fn, dynamic=True)
        return self.compiled[fn](method.__self__, *args)


FUSED = Fusion()
