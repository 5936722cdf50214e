"""rerank: the relevance of each row's document to its query, as the checkpoint's model card computes it (the recipe,
tasks/recipes.py; `task.recipe: auto` picks it from config.json's architectures). Output: `score` and the
recipe's `raw_scores` (the yes/no logits, the score MLP's logit, or the cosine)."""

import numpy as np
import pyarrow as pa

from po_batch.config import ConfigError, RerankTask
from po_batch.tasks.base import Oracle, Reads, Task, list_array
from po_batch.tasks.recipes import HEAD_OF, RECIPE_OF, RECIPES


class Rerank(Task):
    columns = {"score": pa.float32(), "raw_scores": pa.list_(pa.float32())}
    answers = ["relevance"]

    def __init__(self, cfg: RerankTask, key: str, tokenizer, ckpt, image: bool):
        self.key = key
        self.name = RECIPE_OF.get(ckpt.architecture, "qwen3") if cfg.recipe == "auto" else cfg.recipe
        needs = HEAD_OF.get(self.name)
        if needs is not None and ckpt.architecture != needs:
            raise ConfigError(f"{key}.recipe: {self.name} needs a {needs} checkpoint (its head's weights); "
                              f"{ckpt.dir} is a {ckpt.architecture}")
        if self.name not in HEAD_OF and ckpt.architecture in HEAD_OF.values():
            raise ConfigError(f"{key}.recipe: {ckpt.dir} is a {ckpt.architecture}, scored by its own head: use "
                              f"{RECIPE_OF[ckpt.architecture]} (or auto)")
        self.recipe = RECIPES[self.name].build(cfg, tokenizer, ckpt, image)
        r = self.recipe
        self.head, self.width, self.block, self.candidates = r.head, r.width, r.block, r.candidates

    @property
    def outputs(self) -> int:
        return self.recipe.outputs

    def prompt(self, template):
        return self.recipe

    def group(self, fields: dict):
        return self.recipe.group(fields)

    def scores(self, reads: Reads) -> np.ndarray:
        """(N, k) the recipe's raw values."""
        return self.recipe.raw(reads)

    def probs(self, scores: np.ndarray) -> np.ndarray:
        return self.recipe.score(scores)[:, None]

    def values(self, reads: Reads) -> dict[str, pa.Array]:
        raw = self.scores(reads)
        return {"score": pa.array(self.recipe.score(raw), pa.float32()), "raw_scores": list_array(raw)}

    def reference(self, oracle: Oracle, rows: list[dict]) -> np.ndarray:
        return self.recipe.reference(oracle, rows).astype(np.float32)

    def same(self, mine: np.ndarray, ref: np.ndarray) -> bool:
        """Both sides of the recipe's midpoint (0.5 for a probability, 0 for a cosine)."""
        mid = self.recipe.midpoint
        return (self.recipe.score(mine[None])[0] > mid) == (self.recipe.score(ref[None])[0] > mid)

    def describe(self, scores: np.ndarray) -> str:
        return f"score {self.recipe.score(scores[None])[0]:.4f}"
