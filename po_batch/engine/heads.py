"""Task heads over the outputs of a batch (the read rows, or their means). The readout: the logits of the tasks'
candidate tokens, and where a task scores whole continuations, the log-sum-exp over the vocabulary and each row's
target logit; nothing else of the LM head is ever multiplied. Hidden: the hidden states themselves (embeddings).
ModelHead: a head the checkpoint brings (a score MLP, a projector)."""

import torch
import torch.nn.functional as F

CHUNK_ROWS = 256  # full-vocabulary logits are made this many rows at a time (151936 floats a row)


class Readout:
    """hidden (R, H) at the read rows, targets (R,) -> (R, K) float32 candidate logits; with `full_vocab`,
    (R, K + 2): then the log-sum-exp and the target's logit (NaN where a row has no target)."""

    def __init__(self, lm_head_weight: torch.Tensor, candidates: list[int], full_vocab: bool,
                 softcap: float | None = None):
        self.softcap = softcap
        self.rows = lm_head_weight[candidates].clone()
        self.weight = lm_head_weight if full_vocab else None
        self.candidates = torch.tensor(candidates, device=lm_head_weight.device)

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.rows.dtype)
        if self.weight is None:
            return self._cap(F.linear(hidden, self.rows).float())
        return torch.cat([self._full(h, t) for h, t in zip(hidden.split(CHUNK_ROWS), targets.split(CHUNK_ROWS))])

    def _full(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self._cap(F.linear(hidden, self.weight).float())
        target = logits.gather(1, targets.clamp(min=0)[:, None])
        target = target.masked_fill(targets[:, None] < 0, float("nan"))
        return torch.cat([logits[:, self.candidates], torch.logsumexp(logits, 1, keepdim=True), target], 1)

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        """The checkpoint's final-logit soft-cap c*tanh(z/c) (Gemma2), in float32, before anything reads them."""
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

class Hidden:
    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return hidden.float()


class ModelHead:
    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.dtype = next(module.parameters()).dtype

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.module(hidden.to(self.dtype)).float()
