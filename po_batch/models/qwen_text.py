"""The Qwen2/Qwen2.5/Qwen3 decoder shared by every family (Llama-style: LLaVA-NeXT's Mistral is it without biases,
with a sliding window), and the text-only causal LMs built on it.

Prefill only: every layer runs over the packed token stream; the last layer computes queries, the output
projection and the MLP for the last position of each sequence alone, and the final norm sees only those."""

from dataclasses import dataclass

import torch
from torch import nn

from po_batch.layers.attention import varlen_attention
from po_batch.layers.compile import FUSED
from po_batch.layers.context import get_context
from po_batch.layers.linear import MergedLinear
from po_batch.layers.mlp import GatedMLP
from po_batch.layers.norm import RMSNorm
from po_batch.layers.residual import add_projection
from po_batch.layers.rotary import apply_rotary, inv_freq, mrope_axes, mrope_cos_sin


# checkpoint projections fused into one matmul each: name piece -> (fused parameter, shard)
PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


@dataclass
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    hidden_act: str
    qkv_bias: bool           # Qwen2 family
    qk_norm: bool            # Qwen3 family
    tie_word_embeddings: bool
    mrope_section: list[int] | None = None  # None: plain 1-D rope (text-only models)
    mrope_interleaved: bool = False
    sliding_window: int | None = None       # each query sees only this many keys, its own included (Mistral)

    @classmethod
    def from_dict(cls, d: dict, qk_norm: bool, tie: bool) -> "TextConfig":
        """From a text config in any published layout: transformers 4.4x (rope_scaling.type mrope), 4.57
        (rope_scaling + rope_theta) and 5.x (rope_parameters)."""
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported (only default rope and M-RoPE)")
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"], num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), hidden_act=d.get("hidden_act", "silu"),
            qkv_bias=not qk_norm or d.get("attention_bias", False), qk_norm=qk_norm, tie_word_embeddings=tie,
            mrope_section=rope.get("mrope_section"), mrope_interleaved=rope.get("mrope_interleaved", False),
        )


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.qk_norm and cfg.qkv_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def project(self, x, cos, sin, reads: torch.Tensor | None = None):
        """Queries, keys and values, normed and rotated. With `reads` (the rows the task reads), queries are
        computed for those rows only; keys and values always for every row."""
        if reads is None:
            q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            qcos, qsin = cos, sin
        else:
            q = self.qkv_proj.part(x[reads], 0, self.q_size)
            k, v = self.qkv_proj.part(x, self.q_size, self.q_size + 2 * self.kv_size).split(self.kv_size, dim=-1)
            qcos, qsin = cos[reads], sin[reads]
        q = q.view(-1, self.heads, self.head_dim)
        k = k.view(-1, self.kv_heads, self.head_dim)
        v = v.view(-1, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, qcos, qsin), apply_rotary(k, cos, sin), v


class DecoderLayer(nn.Module):
    """Split around the attention kernel: `attn_in` and `attn_out` hold all the matmuls and elementwise work and
    can be compiled (fused) as they are; the varlen attention between them reads the batch's context."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.window = cfg.sliding_window

    def attn_in(self, x, cos, sin, reads: torch.Tensor | None = None):
        return self.self_attn.project(self.input_layernorm(x), cos, sin, reads)

    def attn_out(self, x, o):
        """x (this forward's own tensor) plus the attention output's projection and the MLP's, accumulated into
        it in place (layers/residual.py)."""
        x = add_projection(x, self.self_attn.o_proj, o.flatten(1))
        return self.mlp(self.post_attention_layernorm(x), residual=x)

    def forward(self, x, cos, sin, reads: torch.Tensor | None = None):
        ctx = get_context()
        q, k, v = FUSED.call(self.attn_in, x, cos, sin, reads)
        o = varlen_attention(q, k, v, ctx.text if reads is None else ctx.reads, causal=True, window=self.window)
        return FUSED.call(self.attn_out, x if reads is None else x[reads], o)


class Decoder(nn.Module):
    """Embeddings, layers and final norm; `forward` returns the normed hidden state at the rows the tasks read."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.axes: torch.Tensor | None = None
        if cfg.mrope_section is not None and sum(cfg.mrope_section) != cfg.head_dim // 2:
            raise ValueError(f"config.json: mrope_section {cfg.mrope_section} does not sum to head_dim/2 "
                             f"({cfg.head_dim // 2})")

    def rope(self, positions: torch.Tensor, dtype):
        cfg = self.cfg
        freqs = inv_freq(cfg.head_dim, cfg.rope_theta, positions.device)
        if cfg.mrope_section is None:
            return mrope_cos_sin(positions[0] if positions.dim() == 2 else positions, freqs, None, dtype)
        if self.axes is None or self.axes.device != positions.device:  # built once: a host copy would sync
            self.axes = mrope_axes(cfg.head_dim, cfg.mrope_section, cfg.mrope_interleaved).to(positions.device)
        return mrope_cos_sin(positions, freqs, self.axes, dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, reads: torch.Tensor,
                deepstack: list[torch.Tensor] | None = None, visual: torch.Tensor | None = None):
        """x: (T, hidden) input embeddings; positions: (3, T) or (T,); reads: (R,) the rows to return.
        deepstack[i] is added to the rows `visual` after layer i (Qwen3-VL)."""
        cos, sin = self.rope(positions, x.dtype)
        *body, tail = self.layers
        for i, layer in enumerate(body):
            x = layer(x, cos, sin)
            if deepstack and i < len(deepstack):
                x.index_add_(0, visual, deepstack[i])  # x is this forward's own tensor: no copy of it
        # Deepstack features after the last layer would only touch image rows, never a row that is read.
        return self.norm(tail(x, cos, sin, reads))


class QwenTextLM(nn.Module):
    """Qwen2ForCausalLM / Qwen3ForCausalLM: a decoder and an LM head, text-only."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    # a checkpoint saved as Qwen3Model (an embedding model) has no `model.` prefix (and no LM head)
    renames = [(r"^(embed_tokens|layers|norm)\.", r"model.\1.")]
    packed = PACKED

    @classmethod
    def from_config(cls, d: dict) -> "QwenTextLM":
        qwen3 = d["model_type"] == "qwen3"
        if qwen3:  # Qwen3Config's head_dim defaults to 128, not hidden_size // heads
            d = {"head_dim": 128} | d
        return cls(TextConfig.from_dict(d, qk_norm=qwen3, tie=d.get("tie_word_embeddings", False)))

    def embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, batch) -> torch.Tensor:
        x = self.model.embed_tokens(batch.input_ids)
        return self.model(x, batch.positions, batch.reads)
