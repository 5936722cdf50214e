"""jina-reranker-m0 and jina-reranker-v3 without remote code: the backbones are po-batch's Qwen2-VL and Qwen3, the
heads are reimplemented from the checkpoints' modeling.py (JinaVLForRanking, JinaForRanking) and load strictly
from their `score.*` and `projector.*` tensors. Neither reads an LM head (modeling.py replaces it by an Identity).
The prompts and the scores around the heads are the rerank recipes' (tasks/recipes.py)."""

import torch.nn.functional as F
from torch import nn

from po_batch.models.qwen2_vl import Qwen2VL
from po_batch.models.qwen_text import QwenTextLM, TextConfig

PROJECTOR_DIM = 512  # JinaForRanking.projector_dim, fixed in modeling.py rather than in config.json


class ScoreMLP(nn.Module):
    """JinaVLForRanking.score: Linear(H, H) -> ReLU -> Linear(H, 1), at the last position."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.out_proj(F.relu(self.dense(x)))


class Projector(nn.Module):
    """JinaForRanking.projector: Linear(H, H/2, no bias) -> ReLU -> Linear(H/2, 512, no bias), at each document's
    and the query's special token."""

    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden // 2, bias=False)
        self.fc2 = nn.Linear(hidden // 2, PROJECTOR_DIM, bias=False)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class JinaRerankerM0(Qwen2VL):
    renames = Qwen2VL.renames + [(r"^score\.0\.", "head.dense."), (r"^score\.2\.", "head.out_proj.")]

    def __init__(self, visual: nn.Module, text: TextConfig, image_token_id: int):
        super().__init__(visual, text, image_token_id)
        del self.lm_head
        self.head = ScoreMLP(text.hidden_size)


class JinaRerankerV3(QwenTextLM):
    renames = QwenTextLM.renames + [(r"^projector\.0\.", "head.fc1."), (r"^projector\.2\.", "head.fc2.")]

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg)
        del self.lm_head
        self.head = Projector(cfg.hidden_size)
