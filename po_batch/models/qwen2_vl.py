"""Qwen2-VL: a ViT (LayerNorm blocks, quick-GELU MLP, 2-D rope, full attention within each image) whose merger
feeds a Qwen2 decoder (q/k/v bias, sectioned M-RoPE). Qwen2.5-VL (qwen2_5_vl.py) reuses all but the tower."""

from dataclasses import dataclass, replace

import torch
from torch import nn

from po_batch.layers.mlp import MLP
from po_batch.models.qwen_text import TextConfig
from po_batch.models.vision import (VL_RENAMES, Merger, PatchEmbed, VisionBlock, VisionLanguageModel, fused,
                                    patch_coords, rope_tables, vision_rope_theta)

# transformers' PatchMerger keeps its norm and MLP as `ln_q` and an nn.Sequential
MERGER_RENAMES = [(r"\.merger\.ln_q\.", ".merger.norm."), (r"\.merger\.mlp\.0\.", ".merger.fc1."),
                  (r"\.merger\.mlp\.2\.", ".merger.fc2.")]


@dataclass
class VisionConfig:
    depth: int
    embed_dim: int
    num_heads: int
    mlp_hidden: int
    hidden_act: str
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    out_hidden_size: int   # the decoder's hidden size (`hidden_size` in Qwen2-VL's vision_config)
    in_channels: int = 3
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        return cls(depth=d["depth"], embed_dim=d["embed_dim"], num_heads=d["num_heads"],
                   mlp_hidden=int(d["embed_dim"] * d.get("mlp_ratio", 4)), hidden_act=d.get("hidden_act", "quick_gelu"),
                   patch_size=d["patch_size"], spatial_merge_size=d.get("spatial_merge_size", 2),
                   temporal_patch_size=d.get("temporal_patch_size", 2), out_hidden_size=d["hidden_size"],
                   in_channels=d.get("in_channels", d.get("in_chans", 3)), rope_theta=vision_rope_theta(d))

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, dim, bias=False)
        self.blocks = nn.ModuleList(
            VisionBlock(dim, cfg.num_heads, MLP(dim, cfg.mlp_hidden, cfg.hidden_act)) for _ in range(cfg.depth))
        self.merger = Merger(dim, cfg.spatial_merge_size, cfg.out_hidden_size)

    def embed(self, patches, rows, cols):
        """The patches' embeddings, and the rope tables."""
        return self.patch_embed(patches), *rope_tables(rows, cols, self.cfg.head_dim, self.cfg.rope_theta)

    def forward(self, patches: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        rows, cols, _, _ = patch_coords(grids, cfg.spatial_merge_size, patches.shape[0])
        x, cos, sin = fused(self.embed, patches, rows, cols)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.merger(x)


def text_config(d: dict) -> TextConfig:
    """The decoder's config from either layout: transformers 4.4x keeps the text fields at the top level,
    5.x nests them in text_config. As in transformers, head_dim is hidden_size // heads, and θ, the norm's eps
    and the M-RoPE sections default to 1e6, 1e-5 and [16, 24, 24]."""
    text = d.get("text_config") or d
    tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    cfg = TextConfig.from_dict({"rope_theta": 1e6, "rms_norm_eps": 1e-5} | text, qk_norm=False, tie=tie)
    return replace(cfg, head_dim=cfg.hidden_size // cfg.num_heads, mrope_section=cfg.mrope_section or [16, 24, 24])


class Qwen2VL(VisionLanguageModel):
    renames = VL_RENAMES + MERGER_RENAMES
    vision_config, vision_model = VisionConfig, VisionModel

    @classmethod
    def from_config(cls, d: dict) -> "Qwen2VL":
        return cls(cls.vision_model(cls.vision_config.from_dict(d["vision_config"])), text_config(d),
                   d["image_token_id"])

    def forward(self, batch) -> torch.Tensor:
        lm = self.model.language_model
        x = lm.embed_tokens(batch.input_ids)
        if batch.patches is not None:
            x.index_copy_(0, batch.visual, self.model.visual(batch.patches, batch.grids).to(x.dtype))
        return lm(x, batch.positions, batch.reads)
