"""The engine: a loaded model, a candidate-token head, and the loop that scores prepared samples batch by batch."""

import numpy as np
import torch

from po_batch.engine.batch import make_batch, pack
from po_batch.engine.heads import CandidateHead
from po_batch.layers.attention import backend
from po_batch.layers.compile import FUSED
from po_batch.layers.context import set_context
from po_batch.models.registry import Checkpoint, load_model
from po_batch.sample import Sample

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Engine:
    def __init__(self, ckpt: Checkpoint, token_ids: list[int], device: str = "cpu", dtype: str = "float32",
                 batch_tokens: int = 16384, pixel_mean=None, pixel_std=None, fuse: bool | None = None):
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
        self.fuse = self.device.type == "cuda" if fuse is None else fuse
        FUSED.enable(self.fuse)

    @torch.inference_mode()
    def forward(self, samples: list[Sample]) -> torch.Tensor:
        """One packed forward: (len(samples), K) candidate logits on the device."""
        batch = make_batch(samples, self.image_token_id, self.device)
        set_context(batch.context)
        return self.head(self.model(batch))

    def launch(self, samples: list[Sample]) -> "Pending":
        """Queue the forwards of `samples` (packed by the token budget) on the device and return at once: the
        host can read and pack the next rows while the device runs. `Pending.result()` waits for the logits."""
        groups = pack(samples, self.batch_tokens)
        logits = torch.cat([self.forward([samples[i] for i in g]) for g in groups])
        return Pending(logits, np.concatenate(groups))

    def score(self, samples: list[Sample]) -> np.ndarray:
        """(len(samples), K) float32 logits in input order."""
        return self.launch(samples).result()


class Pending:
    """Logits on their way to the host. On CUDA the copy is queued right behind this batch's work, into pinned
    memory, with an event: waiting for it does not wait for the batches queued after it (a plain .cpu() would)."""

    def __init__(self, logits: torch.Tensor, order: np.ndarray):
        self.order, self.done = order, None
        if logits.is_cuda:
            self.logits = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
            self.logits.copy_(logits, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.logits = logits

    def result(self) -> np.ndarray:
        if self.done is not None:
            self.done.synchronize()
        logits = self.logits.numpy()
        out = np.empty_like(logits)
        out[self.order] = logits
        return out
