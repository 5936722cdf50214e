"""The readout head: at the rows the tasks read, the logits of their candidate tokens, and where a task scores
whole continuations, the log-sum-exp over the vocabulary and each row's target logit. Nothing else of the LM head
is ever multiplied."""

import torch
import torch.nn.functional as F

CHUNK_ROWS = 256  # full-vocabulary logits are made this many rows at a time (151936 floats a row)


class Readout:
    """hidden (R, H) at the read rows, targets (R,) -> (R, K) float32 candidate logits; with `full_vocab`,
    (R, K + 2): then the log-sum-exp and the target's logit (NaN where a row has no target)."""

    def __init__(self, lm_head_weight: torch.Tensor, candidates: list[int], full_vocab: bool):
        self.rows = lm_head_weight[candidates].clone()
        self.weight = lm_head_weight if full_vocab else None
        self.candidates = torch.tensor(candidates, device=lm_head_weight.device)

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return F.linear(hidden, self.rows).float()
        return torch.cat([self._full(h, t) for h, t in zip(hidden.split(CHUNK_ROWS), targets.split(CHUNK_ROWS))])

    def _full(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight).float()
        target = logits.gather(1, targets.clamp(min=0)[:, None])
        target = target.masked_fill(targets[:, None] < 0, float("nan"))
        return torch.cat([logits[:, self.candidates], torch.logsumexp(logits, 1, keepdim=True), target], 1)
