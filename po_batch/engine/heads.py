"""Task heads: read the hidden state at each sequence's last position against only the LM-head rows the task needs."""

import numpy as np
import torch
import torch.nn.functional as F


class CandidateHead:
    """Logits of a few candidate tokens: hidden (B, H) x rows (K, H) -> (B, K), in the model's dtype like the LM head."""

    def __init__(self, lm_head_weight: torch.Tensor, token_ids: list[int]):
        self.rows = lm_head_weight[token_ids].clone()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.rows).float()


def yes_no_columns(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Output columns of the yes_no task from (N, 2) logits [yes, no]; p_yes is the two-way softmax."""
    yes, no = logits[:, 0].astype(np.float32), logits[:, 1].astype(np.float32)
    p_yes = (1.0 / (1.0 + np.exp(no.astype(np.float64) - yes))).astype(np.float32)
    return {"yes_logit": yes, "no_logit": no, "p_yes": p_yes}
