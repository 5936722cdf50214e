"""LLaVA-NeXT (LlavaNextForConditionalGeneration, e.g. llava-v1.6-mistral-7b): CLIP's vision tower read at
vision_feature_layer (-2: the layers after it are never built nor loaded) without its class token, a
linear-GELU-linear projector, and a Mistral (or Llama) decoder: the Qwen decoder without biases, plain rope, an
untied LM head. Each image arrives as its squashed crop and its tiles (prep/llava_next.py); which projected feature,
or the learned image_newline, each image token takes is the batch's layout, computed in prep."""

from dataclasses import replace

import torch
from torch import nn

from po_batch.layers.mlp import MLP
from po_batch.models.clip import ClipConfig, VisionTower
from po_batch.models.qwen_text import PACKED, Decoder, TextConfig

# transformers' MistralConfig and LlamaConfig defaults for keys a config.json leaves out (llava-v1.6-mistral-7b's
# text_config omits the hidden size and the layer and head counts)
MISTRAL = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu", "rms_norm_eps": 1e-6,
           "sliding_window": 4096}
LLAMA = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, "hidden_act": "silu", "rms_norm_eps": 1e-6}
# LlavaNextConfig's tower where config.json has no vision_config
TOWER = {"hidden_size": 1024, "intermediate_size": 4096, "patch_size": 14, "image_size": 336, "num_hidden_layers": 24,
         "num_attention_heads": 16}

# Checkpoints saved before transformers 5 (the published ones) keep language_model.model.*, language_model.lm_head
# and vision_tower.vision_model.*; transformers 5 nests everything but the head under model.
RENAMES = [(r"^language_model\.lm_head\.", "lm_head."), (r"^language_model\.model\.", "model.language_model."),
           (r"^(vision_tower|multi_modal_projector|image_newline)", r"model.\1"),
           (r"\.vision_tower\.vision_model\.", ".vision_tower."),
           (r"\.patch_embedding\.weight$", ".patch_embedding.proj.weight"),
           (r"\.multi_modal_projector\.linear_(\d)\.", r".multi_modal_projector.fc\1.")]


def text_config(d: dict) -> TextConfig:
    t = d.get("text_config") or {}
    kind = t.get("model_type", "llama")  # LlavaNextConfig's default decoder
    if kind not in ("mistral", "llama"):
        raise ValueError(f"text_config: model_type {kind!r} is not supported (Mistral and Llama decoders)")
    for key in ("attention_bias", "mlp_bias"):
        if t.get(key):
            raise ValueError(f"text_config.{key}: true is not supported")
    t = (MISTRAL if kind == "mistral" else LLAMA) | t
    cfg = TextConfig.from_dict(t, qk_norm=False, tie=d.get("tie_word_embeddings", False))
    return replace(cfg, qkv_bias=False, sliding_window=t.get("sliding_window") if kind == "mistral" else None)


def tower_depth(d: dict, vision: ClipConfig) -> int:
    """Layers before the one read: hidden_states[vision_feature_layer] counts the patch embeddings as 0."""
    layer = d.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer: {layer} (several layers concatenated) is not supported")
    depth = layer if layer >= 0 else vision.num_layers + 1 + layer
    if not 0 <= depth <= vision.num_layers:
        raise ValueError(f"vision_feature_layer: {layer} is outside the tower's {vision.num_layers} layers")
    if d.get("vision_feature_select_strategy", "default") != "default":
        raise ValueError(f"vision_feature_select_strategy: {d['vision_feature_select_strategy']!r} is not supported "
                         f"(only 'default': the class token dropped)")
    return depth


class LlavaNext(nn.Module):
    renames = RENAMES
    packed = PACKED

    def __init__(self, vision: ClipConfig, depth: int, text: TextConfig, image_token_id: int, act: str, bias: bool):
        super().__init__()
        self.model = nn.Module()
        self.model.vision_tower = VisionTower(vision, depth)
        self.model.multi_modal_projector = MLP(vision.hidden_size, text.hidden_size, act, text.hidden_size, bias)
        self.model.image_newline = nn.Parameter(torch.empty(text.hidden_size))
        self.model.language_model = Decoder(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.image_token_id = image_token_id
        skipped = "|".join(str(i) for i in range(depth, vision.num_layers))
        self.unread = [r"(^|\.)vision_tower\.(vision_model\.)?post_layernorm\."] + (
            [rf"(^|\.)vision_tower\.(vision_model\.)?encoder\.layers\.({skipped})\."] if skipped else [])

    @classmethod
    def from_config(cls, d: dict) -> "LlavaNext":
        vision = ClipConfig.from_dict(d.get("vision_config") or TOWER)
        return cls(vision, tower_depth(d, vision), text_config(d), d.get("image_token_index", 32000),
                   d.get("projector_hidden_act", "gelu"), d.get("multimodal_projector_bias", True))

    def embeddings(self) -> nn.Embedding:
        return self.model.language_model.embed_tokens

    def attention_lens(self, grids: list[tuple[int, int, int]]) -> tuple[list[int], None]:
        """The tower's sequences for the images of a batch: each crop's class token and patches alone."""
        return [h * w + 1 for t, h, w in grids for _ in range(t)], None

    def fold_pixels(self, mean, std) -> None:
        self.model.vision_tower.embeddings.patch_embedding.fold(mean, std)

    def forward(self, batch) -> torch.Tensor:
        lm = self.model.language_model
        x = lm.embed_tokens(batch.input_ids)
        if batch.patches is not None:
            features = self.model.vision_tower(batch.patches)[batch.features]
            x.index_copy_(0, batch.visual, self.model.multi_modal_projector(features).to(x.dtype))
            x.index_copy_(0, batch.newlines, self.model.image_newline.expand(len(batch.newlines), -1))
        return lm(x, batch.positions, batch.reads)
