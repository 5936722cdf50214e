"""The reader seam: what the plan and the worker ask of an input format (list, describe, stream a unit's rows)."""

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from po_batch.data.schema import Columns


@dataclass(frozen=True)
class Unit:
    id: str
    file: str
    row_start: int
    row_stop: int  # exclusive

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start


class UnitReadError(Exception):
    """The unit's rows cannot be read (a corrupt page, a truncated or vanished file): the unit fails, the others
    go on. str() is one line naming the file and the unit."""

    def __init__(self, unit: Unit, reason: str):
        super().__init__(f"cannot read unit {unit.id} (rows {unit.row_start}-{unit.row_stop} of {unit.file}): "
                         f"{reason}")
        self.unit, self.reason = unit, reason


@dataclass
class ReadError:
    """A row the reader found bad (a member that does not parse, a key seen twice): `kind: message` in the row's
    error column, whatever prep made of the row."""
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass
class Batch:
    """Consecutive rows of a unit. `table` holds the id and passthrough columns (Columns.output, in that order),
    `images` one entry per row: bytes, a path or URL, or None. `errors` maps a row's index within the unit (this
    batch's rows or earlier ones: a key seen again is only known later) to its ReadError; `notes` go into the
    unit's marker. A reader yields its last batch only once it has read the whole unit, so errors and notes are
    complete when the unit's last row is handed on."""
    table: pa.RecordBatch
    images: list
    errors: dict[int, ReadError] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)


class Reader(ABC):
    """One input format. `columns` names the output's id and passthrough columns, and the image column if any."""

    columns: Columns
    extensions: tuple[str, ...]  # of the files a directory or glob lists

    @abstractmethod
    def describe(self, file: str, rows_per_unit: int) -> tuple[dict, pa.Schema]:
        """The file's plan entry -- its identity (size, mtime, footer: a hash that a rewrite moves), rows and
        `cuts` (unit boundaries: units are rows [cuts[k], cuts[k+1])), plus what `read` needs -- and the Arrow
        schema of its columns; PlanError if it cannot be read."""

    @abstractmethod
    def changed(self, entry: dict) -> str | None:
        """How a planned file differs from the file now ('size 120 -> 180, rows 10 -> 15'), or None if it does
        not."""

    def link(self, planned: list[dict], new: list[dict]) -> None:
        """Decisions that depend on several files, written into the entries of `new` (the files planned before
        keep theirs: their parts may be written)."""

    @abstractmethod
    def read(self, unit: Unit, entry: dict) -> Iterator[Batch]:
        """Exactly the unit's rows, in order. Raises UnitReadError when the file cannot be read, PlanError when it
        no longer fits the plan."""
