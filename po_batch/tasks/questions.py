"""Several tasks over one row (`task.questions`, or a single task as one unnamed question): the union of what
they read, where each one's reads sit in the engine's readout, and the row's output columns, prefixed by name."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from po_batch.config import ConfigError
from po_batch.sample import Question
from po_batch.tasks.base import Reads, Task


class Questions:
    def __init__(self, tasks: dict[str, Task]):
        self.tasks = tasks
        self.candidates: list[int] = []
        for t in tasks.values():
            self.candidates += [c for c in t.candidates if c not in self.candidates]
        self.full_vocab = any(t.full_vocab for t in tasks.values())
        self._cols, self._rows, at = {}, {}, 0
        for name, t in tasks.items():
            self._cols[name] = np.array([self.candidates.index(c) for c in t.candidates])
            self._rows[name] = slice(at, at + t.question.reads)
            at += t.question.reads
        self.reads = at  # rows read per input row, the same for every row
        self.width = len(self.candidates) + (2 if self.full_vocab else 0)  # of the readout (engine/heads.py)

    @property
    def questions(self) -> list[Question]:
        return [t.question for t in self.tasks.values()]

    @property
    def schema(self) -> dict[str, pa.DataType]:
        return {_col(name, c): typ for name, t in self.tasks.items() for c, typ in t.columns.items()}

    def check_names(self, taken: list[str]) -> None:
        """Output columns must not collide with the passthrough columns (or with `error`)."""
        for name, t in self.tasks.items():
            for c in t.columns:
                if _col(name, c) in taken + ["error"]:
                    raise ConfigError(f"{t.key}: its output column {_col(name, c)!r} is also an input column; "
                                      "rename the question or leave that column out of input.columns")

    def split(self, readout: np.ndarray) -> dict[str, Reads]:
        """readout (N, reads, width): candidate logits, and with full_vocab the log-sum-exp and the target logit
        -> each task's Reads."""
        k = len(self.candidates)
        if not self.full_vocab:
            readout = np.concatenate([readout, np.full(readout.shape[:2] + (2,), np.nan, np.float32)], 2)
        return {name: Reads(readout[:, rows][:, :, self._cols[name]], readout[:, rows, k], readout[:, rows, k + 1])
                for name, rows in self._rows.items()}

    def columns(self, readout: np.ndarray, failed: np.ndarray) -> dict[str, pa.Array]:
        """The task columns of N rows; rows that `failed` (and rows never scored) are null in each."""
        out, mask = {}, pa.array(failed)
        for name, reads in self.split(readout).items():
            for c, values in self.tasks[name].values(reads).items():
                out[_col(name, c)] = pc.if_else(mask, pa.scalar(None, values.type), values) if failed.any() else values
        return out


def _col(name: str, column: str) -> str:
    return f"{name}_{column}" if name else column
