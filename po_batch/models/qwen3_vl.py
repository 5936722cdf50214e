"""Qwen3-VL: a ViT with learned, bilinearly interpolated position embeddings, 2-D rope and DeepStack mergers,
feeding a Qwen3 decoder (QK-norm, interleaved M-RoPE) whose early layers receive the DeepStack features."""

from dataclasses import dataclass

import torch
from torch import nn

from po_batch.layers.mlp import MLP
from po_batch.models.qwen_text import TextConfig
from po_batch.models.vision import (VL_RENAMES, Merger, PatchEmbed, VisionBlock, VisionLanguageModel, fused,
                                    patch_coords, rope_tables, vision_rope_theta)


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
    num_position_embeddings: int
    deepstack_visual_indexes: list[int]
    in_channels: int = 3
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        return cls(depth=d["depth"], hidden_size=d["hidden_size"], num_heads=d["num_heads"],
                   intermediate_size=d["intermediate_size"], hidden_act=d.get("hidden_act", "gelu_pytorch_tanh"),
                   patch_size=d["patch_size"], spatial_merge_size=d.get("spatial_merge_size", 2),
                   temporal_patch_size=d.get("temporal_patch_size", 2), out_hidden_size=d["out_hidden_size"],
                   num_position_embeddings=d["num_position_embeddings"],
                   deepstack_visual_indexes=list(d.get("deepstack_visual_indexes", [])),
                   in_channels=d.get("in_channels", 3),
                   rope_theta=vision_rope_theta(d))


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, dim, bias=True)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, dim)
        self.side = int(cfg.num_position_embeddings ** 0.5)
        self.blocks = nn.ModuleList(
            VisionBlock(dim, cfg.num_heads, MLP(dim, cfg.intermediate_size, cfg.hidden_act)) for _ in range(cfg.depth))
        self.merger = Merger(dim, cfg.spatial_merge_size, cfg.out_hidden_size)
        self.deepstack_merger_list = nn.ModuleList(
            Merger(dim, cfg.spatial_merge_size, cfg.out_hidden_size, postshuffle=True)
            for _ in cfg.deepstack_visual_indexes)

    def interpolated_pos(self, rows, cols, heights, widths) -> torch.Tensor:
        """The learned side x side table resampled bilinearly (align_corners) to each image's grid."""
        last = self.side - 1

        def taps(idx, size):
            src = idx.float() * last / (size - 1).clamp(min=1).float()
            lo = src.floor()
            frac = src - lo
            lo = lo.long()
            return lo, (lo + 1).clamp(max=last), frac

        r0, r1, fr = taps(rows, heights)
        c0, c1, fc = taps(cols, widths)
        table = self.pos_embed.weight
        return ((table[r0 * self.side + c0] * ((1 - fr) * (1 - fc))[:, None])
                + (table[r0 * self.side + c1] * ((1 - fr) * fc)[:, None])
                + (table[r1 * self.side + c0] * (fr * (1 - fc))[:, None])
                + (table[r1 * self.side + c1] * (fr * fc)[:, None]))

    def embed(self, patches, rows, cols, heights, widths):
        """The patches' embeddings with their positions, and the rope tables."""
        x = self.patch_embed(patches) + self.interpolated_pos(rows, cols, heights, widths).to(self.pos_embed.weight.dtype)
        return x, *rope_tables(rows, cols, self.cfg.hidden_size // self.cfg.num_heads, self.cfg.rope_theta)

    def forward(self, patches: torch.Tensor, grids: torch.Tensor):
        cfg = self.cfg
        rows, cols, heights, widths = patch_coords(grids, cfg.spatial_merge_size, patches.shape[0])
        x, cos, sin = fused(self.embed, patches, rows, cols, heights, widths)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin)
            if i in cfg.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack


class Qwen3VL(VisionLanguageModel):
    renames = VL_RENAMES + [(r"\.linear_fc(\d)\.", r".fc\1.")]

    @classmethod
    def from_config(cls, d: dict) -> "Qwen3VL":
        text = d["text_config"]
        tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        return cls(VisionModel(VisionConfig.from_dict(d["vision_config"])),
                   TextConfig.from_dict(text, qk_norm=True, tie=tie), d["image_token_id"])

    def forward(self, batch) -> torch.Tensor:
        lm = self.model.language_model
        x = lm.embed_tokens(batch.input_ids)
        deepstack = None
        if batch.patches is not None:
            image, deepstack = self.model.visual(batch.patches, batch.grids)
            x.index_copy_(0, batch.visual, image.to(x.dtype))
        return lm(x, batch.positions, batch.reads, deepstack, batch.visual)
