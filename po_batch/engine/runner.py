"""The engine: a loaded model, the readout head, and the loop that scores prepared samples batch by batch."""

import numpy as np
import torch

from po_batch.engine.batch import make_batch, pack
from po_batch.engine.heads import Readout
from po_batch.layers.attention import backend
from po_batch.layers.compile import FUSED
from po_batch.layers.fp8 import quantize_fp8
from po_batch.layers.context import set_context
from po_batch.models.loader import ModelError
from po_batch.models.registry import Checkpoint, load_model
from po_batch.sample import Sample

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Engine:
    def __init__(self, ckpt: Checkpoint, candidates: list[int], device: str = "cpu", dtype: str = "float32",
                 batch_tokens: int = 16384, pixel_mean=None, pixel_std=None, fuse: bool | None = None,
                 full_vocab: bool = False, quantization: str = "none"):
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.batch_tokens = batch_tokens
        self.model = load_model(ckpt, self.dtype, self.device)
        self.image_token_id = ckpt.config.get("image_token_id")
        self.window_lens = self.model.window_lens if ckpt.is_vision else None
        if ckpt.is_vision:
            self.model.fold_pixels(pixel_mean, pixel_std)
        self.head = Readout(self.model.lm_head.weight, candidates, full_vocab)
        if not ckpt.tie and not full_vocab:  # only the task's rows of an untied LM head are ever read
            del self.model.lm_head
        if quantization == "fp8":
            if self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
                raise ModelError(f"model.quantization: fp8 needs a GPU with FP8 matmuls (Ada or Hopper); "
                                 f"{torch.cuda.get_device_name(self.device)} has none")
            quantize_fp8(self.model)  # the readout's LM-head rows and the norms stay in the model's dtype
        self.attention = backend(self.device)
        self.fuse = self.device.type == "cuda" if fuse is None else fuse
        FUSED.enable(self.fuse)

    @torch.inference_mode()
    def forward(self, samples: list[Sample]) -> torch.Tensor:
        """One packed forward: the readout of the samples' read rows, on the device."""
        batch = make_batch(samples, self.image_token_id, self.device, self.window_lens)
        set_context(batch.context)
        return self.head(self.model(batch), batch.targets)

    def launch(self, samples: list[Sample]) -> "Pending":
        """Queue the forwards of `samples` (packed by the token budget) on the device and return at once: the
        host can read and pack the next rows while the device runs. `Pending.result()` waits for the readout."""
        readout = torch.cat([self.forward([samples[i] for i in g]) for g in pack(samples, self.batch_tokens)])
        return Pending(readout, len(samples))

    def score(self, samples: list[Sample]) -> np.ndarray:
        """(len(samples), reads, width) float32 readout in input order: per read row the candidate logits (and
        the log-sum-exp and target logit, see engine/heads.py). Every sample of a run reads the same rows."""
        return self.launch(samples).result()


class Pending:
    """A readout on its way to the host. On CUDA the copy is queued right behind this batch's work, into pinned
    memory, with an event: waiting for it does not wait for the batches queued after it (a plain .cpu() would)."""

    def __init__(self, readout: torch.Tensor, samples: int):
        self.samples, self.done = samples, None
        if readout.is_cuda:
            self.readout = torch.empty(readout.shape, dtype=readout.dtype, pin_memory=True)
            self.readout.copy_(readout, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.readout = readout

    def result(self) -> np.ndarray:
        if self.done is not None:
            self.done.synchronize()
        return self.readout.numpy().reshape(self.samples, -1, self.readout.shape[1])
