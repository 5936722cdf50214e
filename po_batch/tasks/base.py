"""What every task provides: the question prep renders for each row (or its own prompt), what the engine reads there
(LM-head rows, the hidden states, or the checkpoint's own head), the output columns and their types, and the
numbers `po-batch verify` compares with transformers."""

from abc import ABC, abstractmethod
from typing import NamedTuple, Protocol

import numpy as np
import pyarrow as pa

from po_batch.sample import Question


class Reads(NamedTuple):
    """One task's share of the engine's readout for N rows, r outputs per row (the task's `outputs`)."""
    cand: np.ndarray | None    # (N, r, K) float32 logits of the task's candidate tokens (logits tasks)
    lse: np.ndarray | None     # (N, r) log-sum-exp over the whole vocabulary (NaN unless the task reads it)
    target: np.ndarray | None  # (N, r) logit of each output's target token (NaN where it has none)
    values: np.ndarray         # (N, r, width) the readout itself: for hidden and model heads, what they return


class Oracle(Protocol):
    """The reference implementation `verify` compares with (transformers), for one row (its image is set)."""

    def last_logits(self, text: str) -> np.ndarray:
        """(V,) float32 logits at the last position of the row's prompt with `text` as the user's text."""

    def logprob(self, text: str, answer: str) -> float:
        """log P(answer's tokens | prompt with `text`), the answer tokenized after the assistant header."""

    def hidden(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(input ids (L,), last hidden states (L, H) float32) of the row's prompt with `text` as the user's text."""

    def run(self, prompt: str, append: list[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The same for a prompt string as a model card writes it (its special tokens are tokens), tokenized by
        the checkpoint's processor with the row's image, and `append` added after."""

    def encode(self, text: str) -> list[int]:
        """`text`'s ids by the checkpoint's tokenizer, without its special tokens."""

    def last_logits_of(self, ids: list[int]) -> np.ndarray:
        """(V,) float32 logits of the model's LM head at the last position of a prompt given as ids."""

    def lm_rows(self, ids: list[int]) -> np.ndarray:
        """(k, H) float32 rows of the LM head."""

    def tensor(self, name: str) -> np.ndarray:
        """A checkpoint tensor by its name in the checkpoint (a head's weight), float32."""


# verify's tolerance by dtype: float32 must agree to rounding; half precisions are compared on what users read
# fp8: linear layers in e4m3 (model.quantization), against transformers in the model's dtype
TOLERANCE = {"float32": ("score", 1e-3), "bfloat16": ("prob", 0.03), "float16": ("prob", 0.02), "fp8": ("prob", 0.15)}


class Task(ABC):
    key: str                    # where it is configured, for messages: "task" or "task.questions.<name>"
    question: Question
    candidates: list[int] = []  # LM-head rows read at the question's last position
    answers: list[str]          # what each of the scores stands for (yes/no, the labels)
    full_vocab: bool = False    # also the log-sum-exp over the vocabulary and the targets' logits
    columns: dict[str, pa.DataType]  # output columns (before any question-name prefix) and their types
    tolerance = TOLERANCE
    head: str = "logits"        # what the engine reads: LM-head "logits", the "hidden" states, the "model"'s head
    width: int = 0              # the readout's width for hidden and model heads
    block: int = 1              # input rows one prompt may hold (listwise reranking)

    @property
    def outputs(self) -> int:
        """Outputs the engine returns per input row."""
        return self.question.reads

    def prompt(self, template):
        """The prompt prep encodes for each row, when the task renders its own (else None: the template's)."""
        return None

    def group(self, fields: dict):
        """Consecutive rows with the same group share a prompt, up to `block` of them."""
        return None

    @abstractmethod
    def values(self, reads: Reads) -> dict[str, pa.Array]:
        """The output columns for N rows (unmasked: the caller nulls rows that failed)."""

    @abstractmethod
    def scores(self, reads: Reads) -> np.ndarray:
        """(N, k) the task's raw scores (logits or log-probs), what verify compares at float32."""

    @abstractmethod
    def reference(self, oracle: Oracle, rows: list[dict]) -> np.ndarray:
        """(n, k) the same scores computed by the oracle for the rows of one prompt (one row, except for listwise
        reranking), given their fields (a null as "")."""

    def probs(self, scores: np.ndarray) -> np.ndarray:
        """(N, k) what users read as probabilities, compared at half precision: the softmax of the scores."""
        return softmax(scores)

    def difference(self, mine: np.ndarray, ref: np.ndarray) -> float:
        """How far one row's scores are from the oracle's (verify): the largest absolute difference."""
        return float(np.abs(mine - ref).max())

    def same(self, mine: np.ndarray, ref: np.ndarray) -> bool:
        """Whether one row's scores give the oracle's answer."""
        return self.probs(mine[None])[0].argmax() == self.probs(ref[None])[0].argmax()

    def describe(self, scores: np.ndarray) -> str:
        """One row's answer as verify shows it."""
        probs = self.probs(scores[None])[0]
        best = int(probs.argmax())
        return f"{self.answers[best]} {probs[best]:.4f}"


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def list_array(values: np.ndarray) -> pa.Array:
    """(N, k) float32 -> list<float32> with one list of k per row."""
    n, k = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                    pa.array(values.reshape(-1).astype(np.float32)))
