"""embed: one vector per row from the last layer's hidden states (after the final norm), pooled on the device: the
last row (Qwen3-Embedding, Qwen3-VL-Embedding), the mean over all rows, or the mean over the image's span from
<|vision_start|> to <|vision_end|> (jina-embeddings-v4's single vector for an image). Then, on the host: the first
`dim` values (Matryoshka), L2-normalized when asked, in the output dtype."""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from po_batch.config import ConfigError, EmbedTask
from po_batch.prep.prompt import PromptTemplate
from po_batch.sample import NO_TARGET, Question
from po_batch.tasks.base import Oracle, Reads, Task

TYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}


@dataclass
class EmbedPrompt:
    """The template's prompt, reading the rows the pooling averages. Picklable."""
    template: PromptTemplate
    question: Question
    pooling: str
    vision: tuple[int, int] | None  # <|vision_start|>, <|vision_end|> ids

    @property
    def fixed(self) -> list:
        return self.template.fixed

    def encode(self, fields: dict, picture) -> dict:
        ids, positions, segments, targets = self.template.encode([self.question], fields, picture)
        out = {"input_ids": ids, "positions": positions, "segments": segments, "targets": targets}
        if self.pooling == "last":
            return out
        rows = pool_rows(ids, self.pooling, self.vision)
        segments[0, 2] = len(ids)  # one question: one segment, whose last layer runs on every row
        return out | {"targets": np.array([NO_TARGET], dtype=np.int32),
                      "outputs": np.stack([rows, np.zeros_like(rows)], 1).astype(np.int32)}


def pool_rows(ids: np.ndarray, pooling: str, vision: tuple[int, int] | None) -> np.ndarray:
    """The rows `pooling` averages: "last" the last one, "mean" all, "span" the first image's, from its vision
    start to its vision end, both included (as jina-embeddings-v4 does)."""
    if pooling == "last":
        return np.array([len(ids) - 1])
    if pooling == "mean":
        return np.arange(len(ids))
    start, end = (int(np.flatnonzero(ids == t)[0]) for t in vision)
    return np.arange(start, end + 1)


class Embed(Task):
    head = "hidden"
    answers = ["embedding"]
    tolerance = {"float32": ("score", 1e-4), "bfloat16": ("score", 0.01), "float16": ("score", 0.005),  # cosine
                 "fp8": ("score", 0.05)}

    def __init__(self, cfg: EmbedTask, key: str, tokenizer, ckpt, image: bool):
        text = ckpt.config.get("text_config") or ckpt.config
        self.key, self.width = key, text["hidden_size"]
        if cfg.dim is not None and cfg.dim > self.width:
            raise ConfigError(f"{key}.dim: {cfg.dim} is more than the model's hidden size ({self.width})")
        if cfg.pooling == "span" and not image:
            raise ConfigError(f"{key}.pooling: span pools the image's tokens; name input.image_column (of a vision "
                              "model) or use last or mean")
        self.pooling, self.normalize, self.dim = cfg.pooling, cfg.normalize, cfg.dim or self.width
        self.dtype, arrow = TYPES[cfg.output_dtype]
        self.columns = {"embedding": pa.list_(arrow, self.dim)}
        self.question = Question(cfg.prompt)
        vision = ckpt.config.get("vision_start_token_id"), ckpt.config.get("vision_end_token_id")
        self.vision = vision if image else None

    def prompt(self, template: PromptTemplate) -> EmbedPrompt:
        return EmbedPrompt(template, self.question, self.pooling, self.vision)

    def scores(self, reads: Reads) -> np.ndarray:
        """(N, dim) float32: the pooled states' first `dim` values, normalized when asked."""
        return self.finish(reads.values[:, 0])

    def finish(self, pooled: np.ndarray) -> np.ndarray:
        x = pooled[:, :self.dim].astype(np.float32)
        if self.normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def values(self, reads: Reads) -> dict[str, pa.Array]:
        x = self.scores(reads).astype(self.dtype)
        return {"embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), self.dim)}

    def reference(self, oracle: Oracle, rows: list[dict]) -> np.ndarray:
        """transformers' last hidden states of the same prompt, pooled the same way."""
        ids, hidden = oracle.hidden(self.question.text.format_map(rows[0]))
        return self.finish(hidden[pool_rows(ids, self.pooling, self.vision)].mean(0, keepdims=True))

    def difference(self, mine: np.ndarray, ref: np.ndarray) -> float:
        """The cosine distance."""
        return float(1 - mine @ ref / max(np.linalg.norm(mine) * np.linalg.norm(ref), 1e-30))

    def probs(self, scores: np.ndarray) -> np.ndarray:
        return scores

    def same(self, mine: np.ndarray, ref: np.ndarray) -> bool:
        return self.difference(mine, ref) <= 0.01

    def describe(self, scores: np.ndarray) -> str:
        return f"|v| {np.linalg.norm(scores):.4f}, v[:3] {np.array2string(scores[:3], precision=4)}"
