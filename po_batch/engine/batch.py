"""The batch description: samples packed into one token stream without padding, by a token budget. Each sample is a
tree of segments (a shared prefix, questions, label continuations); every token runs once, each segment attends to
its ancestors' keys and its own, and the last layer runs only at the rows the tasks read; where a sample pools
(embeddings) or picks (listwise reranking), its outputs are means of those rows."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from po_batch.layers.context import Context, Varlen, to_device
from po_batch.sample import Sample


@dataclass
class Pool:
    """Outputs as means of read rows: output index[j] takes read row rows[j]; counts (O,) rows per output."""
    rows: torch.Tensor
    index: torch.Tensor
    counts: torch.Tensor

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, H) -> (O, H) float32, whatever the model's dtype: as one matmul with the averaging weights rather
        than a scatter-add, whose atomics would make a rerun differ in the last bits."""
        weights = torch.zeros(len(self.counts), len(hidden), dtype=torch.float32, device=hidden.device)
        weights[self.index, self.rows] = 1 / self.counts[self.index]
        return weights @ hidden.float()


@dataclass
class Batch:
    input_ids: torch.Tensor          # (T,) the packed token stream
    positions: torch.Tensor          # (3, T)
    reads: torch.Tensor              # (R,) rows whose hidden state the head reads, in sample order
    targets: torch.Tensor            # (O,) each output's target token, or -1
    pool: Pool | None                # None: the read rows are the outputs
    visual: torch.Tensor | None      # (V,) rows taking the tower's features, in image order
    features: torch.Tensor | None    # (V,) the tower output row each takes; None: the outputs in order
    newlines: torch.Tensor | None    # rows taking the family's separator embedding (Sample.layout's -1)
    patches: torch.Tensor | None     # (n_patches, 3*p*p) uint8
    grids: torch.Tensor | None       # (n_images, 3)
    context: Context


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


def attention_plan(samples: list[Sample], device) -> tuple[Varlen, Varlen, np.ndarray]:
    """(causal attention over every segment, the last layer's attention from the read rows, the read rows).
    Without shared prefixes each segment is a plain sequence and no keys are gathered."""
    lens = np.concatenate([s.segments[:, 0] for s in samples])
    reads = np.concatenate([s.segments[:, 2] for s in samples])
    ends = np.cumsum(lens)
    rows = np.concatenate([np.arange(e - r, e) for e, r in zip(ends, reads)])
    if all((s.segments[:, 1] < 0).all() for s in samples) and reads.all():
        lens = lens.tolist()
        return Varlen.from_lens(lens, device), Varlen.from_lens(lens, device, reads.tolist()), rows
    keys, first = [], 0  # each segment's key rows: its ancestors' rows, then its own
    for s in samples:
        chains = []
        for n, parent, _ in s.segments:
            chain = [] if parent < 0 else list(chains[parent])
            chains.append(chain + [np.arange(first, first + n)])
            first += n
        keys += [np.concatenate(c) for c in chains]
    key_lens = [len(k) for k in keys]
    text = Varlen.from_lens(key_lens, device, lens.tolist(), _rows(keys, device))
    read = [i for i, r in enumerate(reads) if r]
    last = Varlen.from_lens([key_lens[i] for i in read], device, reads[read].tolist(),
                            _rows([keys[i] for i in read], device))
    return text, last, rows


def _rows(keys: list[np.ndarray], device) -> torch.Tensor:
    return to_device(torch.from_numpy(np.concatenate(keys)), device)


def pool_plan(samples: list[Sample], device) -> Pool | None:
    """The samples' outputs over the batch's read rows; None when every read row is an output of its own."""
    if all(s.outputs is None for s in samples):
        return None
    rows, index, read, out = [], [], 0, 0
    for s in samples:
        n = int(s.segments[:, 2].sum())
        pairs = np.stack([np.arange(n), np.arange(n)], 1) if s.outputs is None else s.outputs
        rows.append(pairs[:, 0] + read)
        index.append(pairs[:, 1] + out)
        read, out = read + n, out + len(s.targets)
    index = np.concatenate(index)
    put = lambda a: to_device(torch.from_numpy(a), device)  # noqa: E731
    return Pool(put(np.concatenate(rows).astype(np.int64)), put(index.astype(np.int64)),
                put(np.bincount(index, minlength=out).astype(np.float32)))


def make_batch(samples: list[Sample], image_token_id: int | None, device: torch.device,
               attention_lens: Callable[[list[tuple[int, int, int]]], tuple[list[int], list[int] | None]] | None = None
               ) -> Batch:
    """Concatenate on the host, then one copy per tensor (from pinned memory on CUDA, without blocking).
    `attention_lens` is the family's layout of the tower's attention over the images: its sequences (an image, or
    a crop) and windows (Qwen2.5-VL); computed here, before the forward, as is the images' token layout, so that no
    model writes the batch's metadata."""
    def put(a: np.ndarray, dtype=None) -> torch.Tensor:
        t = torch.from_numpy(a)
        return to_device(t if dtype is None else t.to(dtype), device)

    ids = np.concatenate([s.input_ids for s in samples])
    text, last, rows = attention_plan(samples, device)
    ctx = Context(text=text, reads=last)
    images = [s for s in samples if s.patches is not None]
    visual = features = newlines = patches = grids = None
    if images:
        grid_list = [s.grid for s in images]
        lens, windows = attention_lens(grid_list)
        ctx.vision = Varlen.from_lens(lens, device)
        if windows is not None:
            ctx.window = Varlen.from_lens(windows, device)
        patches = put_concat([s.patches for s in images], device)
        grids = put(np.array(grid_list, dtype=np.int64))
        slots = np.flatnonzero(ids == image_token_id)  # every image token, image by image
        if images[0].layout is None:
            visual = put(slots)
        else:
            starts = np.cumsum([0] + [len(s.patches) for s in images[:-1]])
            layout = np.concatenate([np.where(s.layout < 0, -1, s.layout + first) for s, first in zip(images, starts)])
            keep = layout >= 0
            visual, features, newlines = put(slots[keep]), put(layout[keep].astype(np.int64)), put(slots[~keep])
    return Batch(input_ids=put(ids, torch.long),
                 positions=put(np.concatenate([s.positions for s in samples], 1), torch.long),
                 reads=put(rows), targets=put(np.concatenate([s.targets for s in samples]), torch.long),
                 pool=pool_plan(samples, device), visual=visual, features=features, newlines=newlines,
                 patches=patches, grids=grids, context=ctx)
