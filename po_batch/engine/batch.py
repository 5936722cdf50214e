"""Packing samples into padding-free batches by a token budget, and moving one batch to the device."""

from dataclasses import dataclass

import numpy as np
import torch

from po_batch.layers.context import Context, Varlen, to_device
from po_batch.sample import Sample


@dataclass
class Batch:
    input_ids: torch.Tensor          # (T,) the packed token stream
    positions: torch.Tensor          # (3, T)
    last: torch.Tensor               # (B,) row of each sequence's last token
    visual: torch.Tensor | None      # (n_image_tokens,) rows holding image tokens, in image order
    patches: torch.Tensor | None     # (n_patches, 3*p*p) uint8
    grids: torch.Tensor | None       # (n_images, 3)
    context: Context
    grid_list: list[tuple[int, int, int]] | None = None  # the grids on the host (Qwen2.5-VL's window lengths)


def pack(samples: list[Sample], budget: int) -> list[list[int]]:
    """Consecutive groups of sample indices whose token counts sum to at most `budget` (a longer sample goes alone)."""
    groups, cur, used = [], [], 0
    for i, s in enumerate(samples):
        if cur and used + s.tokens > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += s.tokens
    if cur:
        groups.append(cur)
    return groups


def put_concat(arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Concatenate straight into pinned memory on CUDA (one host copy of the pixels instead of two)."""
    if device.type != "cuda":
        return torch.from_numpy(np.concatenate(arrays))
    host = torch.empty((sum(len(a) for a in arrays), *arrays[0].shape[1:]), dtype=torch.uint8, pin_memory=True)
    np.concatenate(arrays, out=host.numpy())
    return host.to(device, non_blocking=True)


def make_batch(samples: list[Sample], image_token_id: int | None, device: torch.device) -> Batch:
    """Concatenate on the host, then one copy per tensor (from pinned memory on CUDA, without blocking)."""
    def put(a: np.ndarray, dtype=None) -> torch.Tensor:
        t = torch.from_numpy(a)
        return to_device(t if dtype is None else t.to(dtype), device)

    lens = [s.tokens for s in samples]
    ids = np.concatenate([s.input_ids for s in samples])
    ctx = Context(text=Varlen.from_lens(lens, device), last=Varlen.from_lens(lens, device, [1] * len(lens)))
    images = [s for s in samples if s.patches is not None]
    visual = patches = grids = grid_list = None
    if images:
        grid_list = [s.grid for s in images]
        ctx.vision = Varlen.from_lens([t * h * w for t, h, w in grid_list], device)
        patches = put_concat([s.patches for s in images], device)
        grids = put(np.array(grid_list, dtype=np.int64))
        visual = put(np.flatnonzero(ids == image_token_id))
    return Batch(input_ids=put(ids, torch.long), positions=put(np.concatenate([s.positions for s in samples], 1),
                                                               torch.long),
                 last=put(np.cumsum(lens) - 1), visual=visual, patches=patches, grids=grids, context=ctx,
                 grid_list=grid_list)
