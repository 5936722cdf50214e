"""Gemma2 (Gemma2ForCausalLM; Gemma2Model, the bare decoder of embedders such as bge-multilingual-gemma2): Gemma's
decoder with sandwich norms (after attention and around the MLP), attention scores scaled by
query_pre_attn_scalar^-0.5 and soft-capped (c*tanh(s/c)) before the mask, a sliding window on the layers
transformers' `layer_types` marks (by default the even ones), and soft-capped final logits (applied by the
engine's readout, see Checkpoint.logit_softcap)."""

from po_batch.layers.norm import GemmaRMSNorm
from po_batch.models.gemma import DecoderLayer, Gemma, has_lm_head, text_config
from po_batch.models.qwen_text import TextConfig


def layer_windows(d: dict) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as transformers' Gemma2Config lays them out."""
    n = d["num_hidden_layers"]
    types = d.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types must name sliding_attention or full_attention for each of the {n} layers "
                         f"(got {types})")
    window = d.get("sliding_window", 4096)
    return [window if t == "sliding_attention" and window else None for t in types]


class Gemma2DecoderLayer(DecoderLayer):
    def __init__(self, cfg: TextConfig, scale: float, softcap: float | None, window: int | None):
        super().__init__(cfg, scale, softcap, window)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def attn_out(self, x, o):
        x = x + self.post_attention_layernorm(self.self_attn.o_proj(o.flatten(1)))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2(Gemma):
    """Gemma2ForCausalLM, and Gemma2Model (no LM head; its forward gives the same normed hidden states)."""

    @classmethod
    def from_config(cls, d: dict) -> "Gemma2":
        cfg = text_config(d, d.get("hidden_activation", "gelu_pytorch_tanh"))
        scale = d.get("query_pre_attn_scalar", 256) ** -0.5
        softcap = d.get("attn_logit_softcapping", 50.0)
        return cls(cfg, [Gemma2DecoderLayer(cfg, scale, softcap, w) for w in layer_windows(d)], has_lm_head(d))
