"""The engine: a loaded model, the readout head, and the loop that scores prepared samples batch by batch."""

import numpy as np
import torch

from po_batch.engine.batch import make_batch, pack, shared_prefix
from po_batch.engine.heads import Hidden, ModelHead, Readout
from po_batch.layers.attention import backend
from po_batch.layers.compile import FUSED
from po_batch.layers.context import set_context
from po_batch.layers.fp8 import quantize_fp8
from po_batch.models.loader import ModelError
from po_batch.models.registry import Checkpoint, load_model
from po_batch.sample import Sample

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Engine:
    def __init__(self, ckpt: Checkpoint, candidates: list[int], device: str = "cpu", dtype: str = "float32",
                 batch_tokens: int = 16384, pixel_mean=None, pixel_std=None, fuse: bool | None = None,
                 full_vocab: bool = False, head: str = "logits", quantization: str = "none"):
        """`head`: what the tasks read (tasks/base.py): "logits" of the LM head, the "hidden" states, or the
        checkpoint's own head ("model"). Only "logits" needs an LM head: a checkpoint without one loads for the
        others. `quantization`: "fp8" runs the linear layers in e4m3 (layers/fp8.py)."""
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.batch_tokens = batch_tokens
        self.model = load_model(ckpt, self.dtype, self.device, lm_head=head == "logits")
        self.image_token_id = ckpt.image_token_id
        self.attention_lens = self.model.attention_lens if ckpt.is_vision else None
        if ckpt.is_vision and pixel_mean is not None:  # (without, the rows are text: the tower never runs)
            self.model.fold_pixels(pixel_mean, pixel_std)
        if head == "logits":
            self.head = Readout(self.model.lm_head.weight, candidates, full_vocab, ckpt.logit_softcap)
            if not ckpt.tie and not full_vocab:  # only the task's rows of an untied LM head are ever read
                del self.model.lm_head
        else:
            self.head = Hidden() if head == "hidden" else ModelHead(self.model.head)
        if quantization == "fp8":
            if self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
                raise ModelError(f"model.quantization: fp8 needs a GPU with FP8 matmuls (Ada or Hopper); "
                                 f"{torch.cuda.get_device_name(self.device)} has none")
            # the readout's LM-head rows, a model's own score head and the norms stay in the model's dtype
            quantize_fp8(self.model, keep=("lm_head", "head"))
        self.attention = backend(self.device)
        self.fuse = self.device.type == "cuda" if fuse is None else fuse
        FUSED.enable(self.fuse)

    @torch.inference_mode()
    def forward(self, samples: list[Sample], shared: int | None = None) -> torch.Tensor:
        """One packed forward: the readout of the samples' read rows, on the device. `shared`: their common prefix
        (engine/batch.py shared_prefix; None: found here)."""
        batch = make_batch(samples, self.image_token_id, self.device, self.attention_lens, shared)
        set_context(batch.context)
        hidden = self.model(batch)
        return self.head(hidden if batch.pool is None else batch.pool(hidden), batch.targets)

    def launch(self, samples: list[Sample], shared: int | None = None) -> "Pending":
        """Queue the forwards of `samples` (packed by the token budget) on the device and return at once: the
        host can read and pack the next rows while the device runs. `Pending.result()` waits for the readout.
        The prefix that all of them begin with runs once a batch, and the budget counts it once; `shared`: its
        length where the caller has found it (engine/batch.py shared_prefix; None: found here)."""
        if shared is None:
            shared = shared_prefix(samples, self.image_token_id)
        readout = torch.cat([self.forward([samples[i] for i in g], shared if len(g) > 1 else 0)
                             for g in pack(samples, self.batch_tokens, shared)])
        return Pending(readout, sum(s.rows for s in samples))

    def score(self, samples: list[Sample]) -> np.ndarray:
        """(rows, outputs, width) float32 readout in input order, per input row of the samples (a listwise sample
        scores several): per output the candidate logits (and the log-sum-exp and target logit, see
        engine/heads.py), the hidden state, or the model head's values. Every row of a run has as many outputs."""
        return self.launch(samples).result()


class Pending:
    """A readout on its way to the host. On CUDA the copy is queued right behind this batch's work, into pinned
    memory, with an event: waiting for it does not wait for the batches queued after it (a plain .cpu() would)."""

    def __init__(self, readout: torch.Tensor, rows: int):
        self.rows, self.done = rows, None
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
        return self.readout.numpy().reshape(self.rows, -1, self.readout.shape[1])
