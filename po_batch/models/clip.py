"""CLIP's vision transformer (CLIPVisionModel), as a multimodal model reads its hidden states: square crops of
uint8 patches in, each crop a sequence of a class token and its patches under learned position embeddings, full
attention within each crop, and out the states after `depth` layers (hidden_states[depth] in transformers' count, the
patch embeddings being hidden_states[0]), without the class token."""

from dataclasses import dataclass

import torch
from torch import nn

from po_batch.layers.attention import varlen_attention
from po_batch.layers.compile import FUSED
from po_batch.layers.context import get_context
from po_batch.layers.fp8 import project
from po_batch.layers.linear import MergedLinear
from po_batch.layers.mlp import MLP
from po_batch.models.vision import PatchEmbed

# CLIPVisionConfig's defaults, for keys a config.json leaves out
DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


@dataclass
class ClipConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int          # in the checkpoint
    num_heads: int
    channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    eps: float

    @classmethod
    def from_dict(cls, d: dict) -> "ClipConfig":
        if d.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"vision_config: model_type {d['model_type']!r} is not supported (only CLIP's)")
        d = DEFAULTS | d
        return cls(d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"], d["num_attention_heads"],
                   d["num_channels"], d["image_size"], d["patch_size"], d["hidden_act"], d["layer_norm_eps"])

    @property
    def side(self) -> int:
        """Patches along a crop's side."""
        return self.image_size // self.patch_size


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv_proj = MergedLinear(dim, [dim, dim, dim], bias=True)
        self.out_proj = nn.Linear(dim, dim)


class EncoderLayer(nn.Module):
    """Pre-norm attention and MLP, split around the attention kernel like the decoders' layers."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def attn_in(self, x):
        a = self.self_attn
        return a.qkv_proj(self.layer_norm1(x)).view(-1, 3, a.heads, a.head_dim).unbind(1)

    def attn_out(self, x, o):
        x = x + project(self.self_attn.out_proj, o.flatten(1))
        return self.mlp(self.layer_norm2(x), residual=x)  # fc2 accumulates into x + its bias (layers/residual.py)

    def forward(self, x):
        q, k, v = FUSED.call(self.attn_in, x)
        o = varlen_attention(q, k, v, get_context().vision, causal=False)
        return FUSED.call(self.attn_out, x, o)


class Embeddings(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = PatchEmbed(cfg.channels, None, cfg.patch_size, cfg.hidden_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.side ** 2 + 1, cfg.hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(crops * side^2, C*p*p) uint8 -> (crops * (side^2 + 1), hidden): each crop's class token, then its
        patches."""
        n, dim = len(self.position_embedding.weight), len(self.class_embedding)
        x = self.patch_embedding(patches).view(-1, n - 1, dim)
        x = torch.cat([self.class_embedding.expand(len(x), 1, dim), x], 1)
        return (x + self.position_embedding.weight).flatten(0, 1)


class VisionTower(nn.Module):
    """Expects get_context().vision to hold one sequence of side^2 + 1 per crop."""

    def __init__(self, cfg: ClipConfig, depth: int):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(depth))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(crops * side^2, C*p*p) uint8 -> (crops * side^2, hidden): each patch's state, in the patches' order."""
        x = self.pre_layrnorm(self.embeddings(patches))
        for layer in self.encoder.layers:
            x = layer(x)
        return x.view(-1, self.cfg.side ** 2 + 1, self.cfg.hidden_size)[:, 1:].flatten(0, 1)
