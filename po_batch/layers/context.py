"""Attention metadata for the current forward pass, set by the engine and read by the attention layers."""

from dataclasses import dataclass

import torch


@dataclass
class Varlen:
    """Packed sequences: queries of sequence i are rows cu_q[i]:cu_q[i+1], its keys cu_k[i]:cu_k[i+1]. With
    `key_rows`, the keys are gathered first (k[key_rows]): sequences that share a prefix each list its rows among
    their keys, so a question's tokens attend to the image's keys without a copy of the image's tokens. With
    `ranges` as well ((B, 4) int32: sequence i's own keys are rows [ranges[i, 0], ranges[i, 1]) of the ungathered
    keys, after its ancestors' [ranges[i, 2], ranges[i, 3])), a kernel that takes them reads the keys in place."""
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    lens_q: list[int]
    lens_k: list[int]
    key_rows: torch.Tensor | None = None
    ranges: torch.Tensor | None = None

    @property
    def uniform(self) -> int | None:
        """The common length when every sequence has the same length and queries are keys, else None."""
        if self.lens_q is self.lens_k and self.lens_k and min(self.lens_k) == self.max_k:
            return self.max_k
        return None

    @classmethod
    def from_lens(cls, lens_k: list[int], device, lens_q: list[int] | None = None,
                  key_rows: torch.Tensor | None = None, ranges: torch.Tensor | None = None) -> "Varlen":
        """From per-sequence key lengths (and query lengths, when they differ: queries are the last ones)."""
        cu_k = _cu(lens_k, device)
        if lens_q is None:
            return cls(cu_k, cu_k, max(lens_k, default=0), max(lens_k, default=0), lens_k, lens_k, key_rows, ranges)
        return cls(_cu(lens_q, device), cu_k, max(lens_q, default=0), max(lens_k, default=0), lens_q, lens_k,
                   key_rows, ranges)


def _cu(lens: list[int], device) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
    return to_device(cu, device)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """From pinned memory on CUDA: a copy from pageable memory would wait for all queued device work first."""
    if torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class Context:
    text: Varlen | None = None     # causal attention over each packed text sequence
    reads: Varlen | None = None    # the last layer: only the rows read, each against all its keys up to it
    vision: Varlen | None = None   # full attention within each image
    window: Varlen | None = None   # Qwen2.5-VL window attention within each window


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(ctx: Context) -> None:
    global _CONTEXT
    _CONTEXT = ctx
