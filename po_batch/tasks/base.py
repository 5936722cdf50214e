"""What every task provides: the question prep renders for each row, the LM-head rows the engine reads there, the
output columns and their types, and the numbers `po-batch verify` compares with transformers."""

from abc import ABC, abstractmethod
from typing import NamedTuple, Protocol

import numpy as np
import pyarrow as pa

from po_batch.sample import Question


class Reads(NamedTuple):
    """One task's share of the engine's readout for N rows, r read rows per row (the task's Question.reads)."""
    cand: np.ndarray    # (N, r, K) float32 logits of the task's candidate tokens
    lse: np.ndarray     # (N, r) log-sum-exp over the whole vocabulary (NaN unless the task reads the full vocab)
    target: np.ndarray  # (N, r) logit of each read row's target token (NaN where it has none)


class Oracle(Protocol):
    """The reference implementation `verify` compares with (transformers), for one row."""

    def last_logits(self, text: str) -> np.ndarray:
        """(V,) float32 logits at the last position of the row's prompt with `text` as the user's text."""

    def logprob(self, text: str, answer: str) -> float:
        """log P(answer's tokens | prompt with `text`), the answer tokenized after the assistant header."""


class Task(ABC):
    key: str                    # where it is configured, for messages: "task" or "task.questions.<name>"
    question: Question
    candidates: list[int]       # LM-head rows read at the question's last position
    answers: list[str]          # what each of the scores stands for (yes/no, the labels)
    full_vocab: bool = False    # also the log-sum-exp over the vocabulary and the targets' logits
    columns: dict[str, pa.DataType]  # output columns (before any question-name prefix) and their types

    @abstractmethod
    def values(self, reads: Reads) -> dict[str, pa.Array]:
        """The output columns for N rows (unmasked: the caller nulls rows that failed)."""

    @abstractmethod
    def scores(self, reads: Reads) -> np.ndarray:
        """(N, k) the task's raw scores (logits or log-probs), what verify compares at float32."""

    @abstractmethod
    def reference(self, oracle: Oracle, text: str) -> np.ndarray:
        """(k,) the same scores computed by the oracle for one row whose prompt text is `text`."""

    def probs(self, scores: np.ndarray) -> np.ndarray:
        """(N, k) what users read as probabilities, compared at half precision: the softmax of the scores."""
        return softmax(scores)


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def list_array(values: np.ndarray) -> pa.Array:
    """(N, k) float32 -> list<float32> with one list of k per row."""
    n, k = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                    pa.array(values.reshape(-1).astype(np.float32)))
