"""The engine: a loaded model, a candidate-token head, and the loop that scores prepared samples batch by batch."""

import numpy as np
import torch

from po_batch.engine.batch import make_batch, pack
from po_batch.engine.heads import CandidateHead
from po_batch.layers.attention import backend
from po_batch.layers.context import set_context
from po_batch.models.registry import Checkpoint, load_model
from po_batch.sample import Sample

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Engine:
    def __init__(self, ckpt: Checkpoint, token_ids: list[int], device: str = "cpu", dtype: str = "float32",
                 batch_tokens: int = 16384, pixel_mean=None, pixel_std=None):
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.batch_tokens = batch_tokens
        self.model = load_model(ckpt, self.dtype, self.device)
        self.image_token_id = ckpt.config.get("image_token_id")
        if ckpt.is_vision:
            self.model.fold_pixels(pixel_mean, pixel_std)
        self.head = CandidateHead(self.model.lm_head.weight, token_ids)
        if not ckpt.tie:  # only the task's rows of an untied LM head are ever read
            del self.model.lm_head
        self.attention = backend(self.device)

    @torch.inference_mode()
    def forward(self, samples: list[Sample]) -> torch.Tensor:
        """One packed forward: (len(samples), K) candidate logits on the device."""
        batch = make_batch(samples, self.image_token_id, self.device)
        set_context(batch.context)
        return self.head(self.model(batch))

    def score(self, samples: list[Sample]) -> np.ndarray:
        """(len(samples), K) float32 logits in input order; samples are packed by the token budget."""
        out = np.empty((len(samples), len(self.head.rows)), dtype=np.float32)
        for group in pack(samples, self.batch_tokens):
            out[group] = self.forward([samples[i] for i in group]).cpu().numpy()
        return out
