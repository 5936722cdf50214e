"""Several tasks over one row (`task.questions`, or a single task as one unnamed question): the union of what
they read, where each one's reads sit in the engine's readout, the prompt prep encodes, the rows each prompt
holds, and the row's output columns, prefixed by name."""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from po_batch.config import ConfigError
from po_batch.prep.prompt import PromptTemplate
from po_batch.sample import Question
from po_batch.tasks.base import Reads, Task


@dataclass
class TemplatePrompt:
    """The questions in the checkpoint's chat template (or raw), sharing the image prefix. Picklable."""
    template: PromptTemplate
    questions: list[Question]

    @property
    def fixed(self) -> list:
        return self.template.fixed

    def encode(self, fields: dict, picture) -> dict:
        ids, positions, segments, targets = self.template.encode(self.questions, fields, picture)
        return {"input_ids": ids, "positions": positions, "segments": segments, "targets": targets}


class Questions:
    def __init__(self, tasks: dict[str, Task]):
        self.tasks = tasks
        self.candidates: list[int] = []
        for t in tasks.values():
            self.candidates += [c for c in t.candidates if c not in self.candidates]
        self.full_vocab = any(t.full_vocab for t in tasks.values())
        self.head = next(iter(tasks.values())).head  # questions are yes_no and labels: all read logits
        self._cols, self._rows, at = {}, {}, 0
        for name, t in tasks.items():
            self._cols[name] = np.array([self.candidates.index(c) for c in t.candidates], dtype=np.int64)
            self._rows[name] = slice(at, at + t.outputs)
            at += t.outputs
        self.reads = at  # outputs per input row, the same for every row
        if self.head == "logits":
            self.width = len(self.candidates) + (2 if self.full_vocab else 0)  # of the readout (engine/heads.py)
        else:
            self.width = next(iter(tasks.values())).width
        self.block = max(t.block for t in tasks.values())

    @property
    def questions(self) -> list[Question]:
        return [t.question for t in self.tasks.values()]

    def prompt(self, template: PromptTemplate | None):
        """What prep encodes for each row: the single task's own prompt, or the questions in the template."""
        if len(self.tasks) == 1:
            own = next(iter(self.tasks.values())).prompt(template)
            if own is not None:
                return own
        return TemplatePrompt(template, self.questions)

    def blocks(self, items):
        """(key, (image, fields)) items with key (unit state, row), in row order -> ((state, first row, rows),
        (image, fields)) where a block of several rows (listwise tasks) has a list of their fields. A block holds
        consecutive rows of one unit with the same group, at most `block` of them: cut by the data alone, so a
        resumed run prompts exactly as an uninterrupted one."""
        if self.block == 1:
            for (st, i), row in items:
                yield (st, i, 1), row
            return
        task = next(iter(self.tasks.values()))
        unit = group = start = None
        rows = []
        for (st, i), (_, fields) in items:
            g = task.group(fields)
            if rows and (st is not unit or g != group or len(rows) == self.block):
                yield (unit, start, len(rows)), (None, rows)
                rows = []
            if not rows:
                unit, group, start = st, g, i
            rows.append(fields)
        if rows:
            yield (unit, start, len(rows)), (None, rows)

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
        """readout (N, reads, width): for logits, the candidate logits, and with full_vocab the log-sum-exp and the
        target logit; else what the head returned -> each task's Reads."""
        if self.head != "logits":
            return {name: Reads(None, None, None, readout[:, rows]) for name, rows in self._rows.items()}
        k = len(self.candidates)
        if not self.full_vocab:
            readout = np.concatenate([readout, np.full(readout.shape[:2] + (2,), np.nan, np.float32)], 2)
        return {name: Reads(readout[:, rows][:, :, self._cols[name]], readout[:, rows, k], readout[:, rows, k + 1],
                            readout[:, rows]) for name, rows in self._rows.items()}

    def columns(self, readout: np.ndarray, failed: np.ndarray) -> dict[str, pa.Array]:
        """The task columns of N rows; rows that `failed` (and rows never scored) are null in each."""
        out, mask = {}, pa.array(failed)
        for name, reads in self.split(readout).items():
            for c, values in self.tasks[name].values(reads).items():
                out[_col(name, c)] = pc.if_else(mask, pa.scalar(None, values.type), values) if failed.any() else values
        return out


def _col(name: str, column: str) -> str:
    return f"{name}_{column}" if name else column
