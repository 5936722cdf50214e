"""The batch description: samples packed into one token stream without padding, by a token budget. Each sample is a
tree of segments (a shared prefix, questions, label continuations); every token runs once, each segment attends to
its ancestors' keys and its own, and the last layer runs only at the rows the tasks read; where a sample pools
(embeddings) or picks (listwise reranking), its outputs are means of those rows."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from po_batch.layers import attention
from po_batch.layers.context import Context, Varlen, to_device
from po_batch.sample import Sample

# The fewest leading rows in common that make_batch runs once for a whole batch (0: never). A switch so that
# benchmarks can compare both.
SHARE_PREFIX = 8


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


def pack(samples: list[Sample], budget: int, shared: int = 0) -> list[list[int]]:
    """Consecutive groups of sample indices whose token counts sum to at most `budget` (a longer sample goes alone);
    the `shared` prefix rows that every sample begins with count once per group (make_batch runs them once)."""
    groups, cur, used = [], [], 0
    for i, s in enumerate(samples):
        if cur and used + s.tokens - shared > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += s.tokens - (shared if len(cur) > 1 else 0)
    if cur:
        groups.append(cur)
    return groups


def common_rows(a: Sample, b: Sample, image_token_id: int | None) -> int:
    """How many leading rows two samples have in common: the same tokens at the same positions, in each one's first
    segment, before any image token (an image's tokens take its own sample's features) and short of the rows each
    reads (at least one row stays each sample's own)."""
    limit = min(int(s.segments[0, 0]) - max(int(s.segments[0, 2]), 1) for s in (a, b))
    if limit <= 0:
        return 0
    same = (a.input_ids[:limit] == b.input_ids[:limit]) & (a.positions[:, :limit] == b.positions[:, :limit]).all(0)
    if image_token_id is not None:
        same &= a.input_ids[:limit] != image_token_id
    return limit if same.all() else int(np.argmin(same))


def worth_sharing(rows: int) -> int:
    """`rows` in common, where that is enough to run them once for a batch (SHARE_PREFIX); else 0."""
    return rows if SHARE_PREFIX and rows >= SHARE_PREFIX else 0


def shared_prefix(samples: list[Sample], image_token_id: int | None) -> int:
    """The leading rows that every sample has in common (common_rows) where make_batch runs them once for the
    batch, each sample's first segment attending to that one copy as a question attends to its image (causal
    attention: a prefix's rows are the same whatever follows): a reranker's judge prompt and instruction, a system
    prompt. 0 for fewer than SHARE_PREFIX rows or one sample."""
    if len(samples) < 2:
        return 0
    return worth_sharing(min(common_rows(samples[0], s, image_token_id) for s in samples[1:]))


def put_concat(arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Concatenate straight into pinned memory on CUDA (one host copy of the pixels instead of two)."""
    if device.type != "cuda":
        return torch.from_numpy(np.concatenate(arrays))
    host = torch.empty((sum(len(a) for a in arrays), *arrays[0].shape[1:]), dtype=torch.uint8, pin_memory=True)
    np.concatenate(arrays, out=host.numpy())
    return host.to(device, non_blocking=True)


def attention_plan(samples: list[Sample], device, shared: int = 0) -> tuple[Varlen, Varlen, np.ndarray]:
    """(causal attention over every segment, the last layer's attention from the read rows, the read rows).
    Without shared prefixes each segment is a plain sequence and no keys are gathered. `shared`: the batch's first
    rows are the prefix that every sample begins with (shared_prefix), a segment of its own, and each sample's
    first segment holds the rest of it."""
    segs = [(shared, -1, 0)] if shared else []  # (length, parent: its index in the batch or -1, rows read)
    for s in samples:
        base = len(segs)
        for j, (n, parent, read) in enumerate(s.segments.tolist()):
            if j == 0 and shared:
                segs.append((n - shared, 0, read))
            else:
                segs.append((n, -1 if parent < 0 else base + parent, read))
    lens, parents, reads = np.array(segs, dtype=np.int64).reshape(-1, 3).T
    ends = np.cumsum(lens)
    starts = ends - lens
    rows = np.concatenate([np.arange(e - r, e) for e, r in zip(ends, reads)])
    if (parents < 0).all() and reads.all():
        lens = lens.tolist()
        return Varlen.from_lens(lens, device), Varlen.from_lens(lens, device, reads.tolist()), rows
    chains = []  # each segment's key rows as (start, end) ranges: its ancestors', then its own
    for i, parent in enumerate(parents.tolist()):
        chains.append(([] if parent < 0 else chains[parent]) + [(int(starts[i]), int(ends[i]))])
    keys = [np.concatenate([np.arange(a, b) for a, b in c]) for c in chains]
    key_lens = [len(k) for k in keys]
    read = [i for i, r in enumerate(reads) if r]
    ranges = _ranges(chains) if attention.PREFIX_IN_PLACE else None  # for the kernel only: not built unread
    text = Varlen.from_lens(key_lens, device, lens.tolist(), _rows(keys, device), _put(ranges, device))
    last = Varlen.from_lens([key_lens[i] for i in read], device, reads[read].tolist(),
                            _rows([keys[i] for i in read], device), _put(ranges, device, read))
    return text, last, rows


def _ranges(chains: list[list[tuple[int, int]]]) -> np.ndarray | None:
    """(S, 4) int32: each segment's own key rows [start, end) and its ancestors' [start, end), where every
    segment's ancestors lie in one run of rows (a prefix and its first question, or one prefix), so that a
    kernel reads the keys where they are instead of gathered; else None."""
    out = np.zeros((len(chains), 4), dtype=np.int32)
    for i, chain in enumerate(chains):
        *up, own = chain
        if any(a[1] != b[0] for a, b in zip(up, up[1:])):
            return None
        out[i] = (*own, *((up[0][0], up[-1][1]) if up else (0, 0)))
    return out


def _rows(keys: list[np.ndarray], device) -> torch.Tensor:
    return to_device(torch.from_numpy(np.concatenate(keys)), device)


def _put(ranges: np.ndarray | None, device, pick: list[int] | None = None) -> torch.Tensor | None:
    if ranges is None:
        return None
    return to_device(torch.from_numpy(np.ascontiguousarray(ranges if pick is None else ranges[pick])), device)


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
               attention_lens: Callable[[list[tuple[int, int, int]]], tuple[list[int], list[int] | None]] | None = None,
               shared: int | None = None) -> Batch:
    """Concatenate on the host, then one copy per tensor (from pinned memory on CUDA, without blocking).
    `attention_lens` is the family's layout of the tower's attention over the images: its sequences (an image, or
    a crop) and windows (Qwen2.5-VL); computed here, before the forward, as is the images' token layout, so that no
    model writes the batch's metadata. `shared`: the samples' common prefix (shared_prefix; None: found here), run
    once at the batch's start."""
    def put(a: np.ndarray, dtype=None) -> torch.Tensor:
        t = torch.from_numpy(a)
        return to_device(t if dtype is None else t.to(dtype), device)

    if shared is None:
        shared = shared_prefix(samples, image_token_id)
    ids = np.concatenate([samples[0].input_ids[:shared]] + [s.input_ids[shared:] for s in samples])
    text, last, rows = attention_plan(samples, device, shared)
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
                 positions=put(np.concatenate([samples[0].positions[:, :shared]]
                                              + [s.positions[:, shared:] for s in samples], 1), torch.long),
                 reads=put(rows), targets=put(np.concatenate([s.targets for s in samples]), torch.long),
                 pool=pool_plan(samples, device), visual=visual, features=features, newlines=newlines,
                 patches=patches, grids=grids, context=ctx)
