"""Gemma (GemmaForCausalLM, e.g. bge-reranker-v2-gemma): a Llama-style decoder whose embeddings are scaled by
sqrt(hidden) rounded to the compute dtype, whose RMSNorms scale by (1 + weight) in float32, with GeGLU MLPs,
multi-query attention of head_dim 256 and an LM head tied to the embeddings. Gemma2 (gemma2.py) builds on its parts.

Prefill only, as the Qwen decoder: the last layer computes queries, the output projection and the MLP at the read
rows alone, and the final norm sees only those."""

from dataclasses import replace

import torch
from torch import nn

from po_batch.layers.attention import varlen_attention
from po_batch.layers.compile import FUSED
from po_batch.layers.context import get_context
from po_batch.layers.mlp import GatedMLP
from po_batch.layers.norm import GemmaRMSNorm
from po_batch.layers.residual import add_projection
from po_batch.layers.rotary import inv_freq, mrope_cos_sin
from po_batch.models.qwen_text import PACKED, Attention, TextConfig

# The bare decoder's checkpoints (GemmaModel, Gemma2Model: embedders such as bge-multilingual-gemma2) name its
# tensors without the `model.` prefix and have no LM head.
BARE_RENAMES = [(r"^(?!model\.|lm_head\.)", "model.")]


def text_config(d: dict, act: str) -> TextConfig:
    """The decoder's shapes in the shared TextConfig. As transformers' Gemma configs: head_dim 256 and eps 1e-6
    unless given, no biases, causal attention."""
    for key in ("attention_bias", "use_bidirectional_attention"):
        if d.get(key):
            raise ValueError(f"{key}: true is not supported for {d['model_type']}")
    cfg = TextConfig.from_dict({"head_dim": 256, "rms_norm_eps": 1e-6} | d | {"hidden_act": act}, qk_norm=False,
                               tie=d.get("tie_word_embeddings", True))
    return replace(cfg, qkv_bias=False)


def has_lm_head(d: dict) -> bool:
    return not any(a.endswith("Model") for a in d.get("architectures") or [])


def embed_scale(hidden: int, dtype: torch.dtype) -> float:
    """sqrt(hidden) as transformers applies it: rounded to the compute dtype first (sqrt(2048) becomes 45.25 in
    bfloat16)."""
    return torch.tensor(hidden ** 0.5, dtype=dtype).item()


class DecoderLayer(nn.Module):
    """Pre-norm attention and GeGLU MLP, split around the attention kernel like the Qwen decoder's layers;
    `scale`, `softcap` and `window` are this layer's attention (Gemma2 sets them)."""

    def __init__(self, cfg: TextConfig, scale: float | None = None, softcap: float | None = None,
                 window: int | None = None):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.scale, self.softcap, self.window = scale, softcap, window

    def attn_in(self, x, cos, sin, reads: torch.Tensor | None = None):
        return self.self_attn.project(self.input_layernorm(x), cos, sin, reads)

    def attn_out(self, x, o):
        x = add_projection(x, self.self_attn.o_proj, o.flatten(1))  # in place (layers/residual.py)
        return self.mlp(self.post_attention_layernorm(x), residual=x)

    def forward(self, x, cos, sin, reads: torch.Tensor | None = None):
        ctx = get_context()
        q, k, v = FUSED.call(self.attn_in, x, cos, sin, reads)
        o = varlen_attention(q, k, v, ctx.text if reads is None else ctx.reads, causal=True, scale=self.scale,
                             softcap=self.softcap, window=self.window)
        return FUSED.call(self.attn_out, x if reads is None else x[reads], o)


class Decoder(nn.Module):
    """Scaled embeddings, the layers and the final norm; `forward` returns the normed hidden state at the rows the
    tasks read."""

    def __init__(self, cfg: TextConfig, layers: list[nn.Module]):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        """input_ids: (T,); positions: (3, T) with equal rows (text only) or (T,); reads: (R,)."""
        x = self.embed_tokens(input_ids)
        x = x * embed_scale(self.cfg.hidden_size, x.dtype)
        freqs = inv_freq(self.cfg.head_dim, self.cfg.rope_theta, x.device)
        cos, sin = mrope_cos_sin(positions[0] if positions.dim() == 2 else positions, freqs, None, x.dtype)
        *body, tail = self.layers
        for layer in body:
            x = layer(x, cos, sin)
        return self.norm(tail(x, cos, sin, reads))


class Gemma(nn.Module):
    """GemmaForCausalLM (and the bare GemmaModel, without its head)."""

    renames = BARE_RENAMES
    packed = PACKED

    def __init__(self, cfg: TextConfig, layers: list[nn.Module], lm_head: bool):
        super().__init__()
        self.model = Decoder(cfg, layers)
        if lm_head:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @classmethod
    def from_config(cls, d: dict) -> "Gemma":
        # transformers' GemmaConfig reads the "gelu" of the published configs as the tanh approximation
        act = d.get("hidden_act", "gelu_pytorch_tanh")
        cfg = text_config(d, "gelu_pytorch_tanh" if act == "gelu" else act)
        return cls(cfg, [DecoderLayer(cfg) for _ in range(cfg.num_layers)], has_lm_head(d))

    def embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, batch) -> torch.Tensor:
        return self.model(batch.input_ids, batch.positions, batch.reads)
