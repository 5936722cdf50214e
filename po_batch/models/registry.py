"""Which model class serves a checkpoint (by config.json's model_type), and loading one ready to run."""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from po_batch.models import loader
from po_batch.models.gemma import Gemma
from po_batch.models.gemma2 import Gemma2
from po_batch.models.loader import ModelError
from po_batch.models.jina import JinaRerankerM0, JinaRerankerV3
from po_batch.models.llava_next import LlavaNext
from po_batch.models.qwen2_5_vl import Qwen2_5_VL
from po_batch.models.qwen2_vl import Qwen2VL
from po_batch.models.qwen3_vl import Qwen3VL
from po_batch.models.qwen_text import QwenTextLM

FAMILIES: dict[str, type[nn.Module]] = {
    "qwen3_vl": Qwen3VL,
    "qwen2_vl": Qwen2VL,
    "qwen2_5_vl": Qwen2_5_VL,
    "qwen2": QwenTextLM,
    "qwen3": QwenTextLM,
    "gemma": Gemma,
    "gemma2": Gemma2,
    "llava_next": LlavaNext,
}

# transformers' defaults for keys that published configs omit, where they decide how a checkpoint loads or reads
CONFIG_DEFAULTS = {"gemma": {"tie_word_embeddings": True},
                   "gemma2": {"tie_word_embeddings": True, "final_logit_softcapping": 30.0},
                   "llava_next": {"image_token_index": 32000}}


# checkpoints whose architecture adds a head to a family's backbone (config.json's architectures[0])
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "JinaVLForRanking": JinaRerankerM0,
    "JinaForRanking": JinaRerankerV3,
}


def register(model_type: str, cls: type[nn.Module]) -> None:
    FAMILIES[model_type] = cls


@dataclass
class Checkpoint:
    dir: Path
    config: dict
    family: type[nn.Module]

    @property
    def is_vision(self) -> bool:
        return "vision_config" in self.config

    @property
    def architecture(self) -> str | None:
        return (self.config.get("architectures") or [None])[0]

    @property
    def tie(self) -> bool:
        text = self.config.get("text_config", {})
        return self.config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))

    @property
    def image_token_id(self) -> int | None:
        """The token that stands for an image's tokens (LLaVA's configs call it image_token_index)."""
        return next((self.config[k] for k in ("image_token_id", "image_token_index") if k in self.config), None)

    @property
    def logit_softcap(self) -> float | None:
        """c where the LM head's logits are c*tanh(z/c) (Gemma2's final-logit soft-cap), else None."""
        return self.config.get("final_logit_softcapping")

    @property
    def reference_attention(self) -> str:
        """transformers' attention implementation that computes this checkpoint exactly: its SDPA path has no
        score soft-cap, so Gemma2 needs eager."""
        return "eager" if self.config.get("model_type") == "gemma2" else "sdpa"


def open_checkpoint(path: str) -> Checkpoint:
    model_dir = loader.resolve(path)
    config = loader.read_config(model_dir)
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ModelError(f"{model_dir}/config.json: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(sorted(FAMILIES))})")
    ckpt = Checkpoint(model_dir, CONFIG_DEFAULTS.get(model_type, {}) | config, FAMILIES[model_type])
    ckpt.family = ARCHITECTURES.get(ckpt.architecture, ckpt.family)
    return ckpt


def load_model(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, lm_head: bool = True) -> nn.Module:
    """`lm_head`: whether anything reads the LM head; without, it is dropped and not read from the checkpoint. A
    model's `unread` patterns name checkpoint tensors it deliberately does not hold (LLaVA-NeXT's tower past the
    layer it reads)."""
    try:
        model = loader.build(ckpt.family, ckpt.config, dtype, device)
    except (KeyError, ValueError) as e:
        raise ModelError(f"{ckpt.dir}/config.json: {e}") from None
    unused = list(model.unread) if hasattr(model, "unread") else []
    if not lm_head:
        if hasattr(model, "lm_head"):
            del model.lm_head
        unused.append(r"^lm_head\.")
    loader.load_weights(model, ckpt.dir, ckpt.family.renames, ckpt.family.packed, ckpt.tie, unused)
    return model
