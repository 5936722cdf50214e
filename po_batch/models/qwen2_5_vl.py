"""Qwen2.5-VL: Qwen2-VL with a ViT of RMSNorm blocks and SiLU-gated MLPs that attends within windows of
merged tokens, except in its full-attention blocks; the decoder and everything around the tower are Qwen2-VL's.

The tower runs on the patches regrouped window by window (in units of merged tokens) and puts the merged
tokens back in image order at the end, as transformers does."""

from dataclasses import dataclass

import torch
from torch import nn

from po_batch.layers.mlp import GatedMLP
from po_batch.models import qwen2_vl
from po_batch.models.qwen2_vl import Qwen2VL
from po_batch.models.vision import Merger, PatchEmbed, VisionBlock, fused, patch_coords, vision_rope_theta


@dataclass
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    out_hidden_size: int
    window_size: int                 # in pixels
    fullatt_block_indexes: list[int]  # blocks that attend over the whole image
    in_channels: int = 3
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        cfg = cls(depth=d["depth"], hidden_size=d["hidden_size"], num_heads=d["num_heads"],
                  intermediate_size=d["intermediate_size"], hidden_act=d.get("hidden_act", "silu"),
                  patch_size=d["patch_size"], spatial_merge_size=d.get("spatial_merge_size", 2),
                  temporal_patch_size=d.get("temporal_patch_size", 2), out_hidden_size=d["out_hidden_size"],
                  window_size=d.get("window_size", 112),
                  fullatt_block_indexes=list(d.get("fullatt_block_indexes", [7, 15, 23, 31])),
                  in_channels=d.get("in_channels", d.get("in_chans", 3)), rope_theta=vision_rope_theta(d))
        if cfg.window_side < 1:
            raise ValueError(f"vision_config.window_size {cfg.window_size} is smaller than one merged token "
                             f"({cfg.patch_size * cfg.spatial_merge_size} px)")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def window_side(self) -> int:
        """A window's side in merged tokens."""
        return self.window_size // self.spatial_merge_size // self.patch_size


def window_order(grids: torch.Tensor, merge: int, side: int, n: int) -> torch.Tensor:
    """Where each of the n merged tokens of the packed images (raster order in each image) goes when they are
    regrouped window by window: side x side windows in raster order, raster order inside each, windows clipped at
    the image's right and bottom edges. One pass on the device, no loop over images."""
    gh, gw = grids[:, 1] // merge, grids[:, 2] // merge
    counts = grids[:, 0] * gh * gw
    gh, gw = (torch.repeat_interleave(v, counts, output_size=n) for v in (gh, gw))
    starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts, output_size=n)
    i = torch.arange(n, device=grids.device)
    within = (i - starts) % (gh * gw)  # position in its frame
    r, c = within // gw, within % gw
    r0, c0 = r - r % side, c - c % side  # the window's top-left token
    win_h, win_w = (gh - r0).clamp(max=side), (gw - c0).clamp(max=side)
    return i - within + r0 * gw + c0 * win_h + (r - r0) * win_w + (c - c0)


def window_lens(grid_list: list[tuple[int, int, int]], merge: int, side: int) -> list[int]:
    """Patches in each window, in the order window_order puts them (on the host: attention needs the lengths
    there). Edge windows are smaller; none is empty (transformers drops its empty windows too)."""
    lens = []
    for t, h, w in grid_list:
        gh, gw = h // merge, w // merge
        heights = [min(side, gh - r) for r in range(0, gh, side)]
        widths = [min(side, gw - c) for c in range(0, gw, side)]
        lens += [a * b * merge * merge for a in heights for b in widths] * t
    return lens


class VisionModel(qwen2_vl.VisionModel):
    """Qwen2-VL's tower (its `embed`) with these blocks and merger, run window by window."""

    def __init__(self, cfg: VisionConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        dim = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, dim, bias=False)
        self.blocks = nn.ModuleList(
            VisionBlock(dim, cfg.num_heads, GatedMLP(dim, cfg.intermediate_size, cfg.hidden_act, bias=True), rms=True)
            for _ in range(cfg.depth))
        self.merger = Merger(dim, cfg.spatial_merge_size, cfg.out_hidden_size, rms=True)

    def forward(self, patches: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """Expects get_context().window to hold the window lengths (the batch holds Qwen2_5_VL.window_lens)."""
        cfg = self.cfg
        unit = cfg.spatial_merge_size ** 2
        n = patches.shape[0] // unit
        dest = window_order(grids, cfg.spatial_merge_size, cfg.window_side, n)
        order = torch.empty_like(dest)
        order[dest] = torch.arange(n, device=dest.device)
        # Regroup the uint8 patches and their coordinates; the patch embedding and the rope act per row.
        rows, cols, _, _ = patch_coords(grids, cfg.spatial_merge_size, patches.shape[0])
        rows, cols = rows.view(n, unit)[order].flatten(), cols.view(n, unit)[order].flatten()
        x, cos, sin = fused(self.embed, patches.view(n, unit, -1)[order].flatten(0, 1), rows, cols)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, window=i not in cfg.fullatt_block_indexes)
        return self.merger(x)[dest]


class Qwen2_5_VL(Qwen2VL):
    vision_config, vision_model = VisionConfig, VisionModel

    def window_lens(self, grids: list[tuple[int, int, int]]) -> list[int]:
        cfg = self.model.visual.cfg
        return window_lens(grids, cfg.spatial_merge_size, cfg.window_side)
