"""The Arrow types of the input columns: which ones po-batch accepts, and one output schema for the id and
passthrough columns over files whose types differ only in ways that lose nothing (int32 and int64, null and
string), so that every part of an output reads together."""

import base64
from dataclasses import dataclass

import pyarrow as pa

from po_batch.data.errors import PlanError


@dataclass(frozen=True)
class Columns:
    id: str
    image: str | None = None
    passthrough: tuple[str, ...] = ()

    @property
    def output(self) -> list[str]:
        return [self.id, *self.passthrough]


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def check_columns(file: str, schema: pa.Schema, cols: Columns) -> None:
    names = schema.names
    for c in [*cols.output, *([cols.image] if cols.image else [])]:
        if c not in names:
            raise PlanError(f"column '{c}' not found in {file} (it has: {', '.join(names)})")
    t = schema.field(cols.id).type
    if not (pa.types.is_integer(t) or _is_text(t)):
        raise PlanError(f"input.id_column '{cols.id}' is {t} in {file}; ids must be integers or strings")
    if cols.image:
        t = schema.field(cols.image).type
        if not (pa.types.is_binary(t) or pa.types.is_large_binary(t) or _is_text(t)):
            raise PlanError(f"input.image_column '{cols.image}' is {t} in {file}; it must hold image bytes "
                            "(binary) or paths (string)")


_SIGNED = {8: pa.int8(), 16: pa.int16(), 32: pa.int32(), 64: pa.int64()}


def _common(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type both cast to without loss, or None."""
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        sa, sb = pa.types.is_signed_integer(a), pa.types.is_signed_integer(b)
        if sa == sb:
            return a if a.bit_width >= b.bit_width else b
        s, u = (a, b) if sa else (b, a)
        width = max(s.bit_width, 2 * u.bit_width)  # a signed type holds every value of an unsigned one half as wide
        return _SIGNED.get(width)
    if pa.types.is_floating(a) and pa.types.is_floating(b):
        return a if a.bit_width >= b.bit_width else b
    for small, large in ((pa.string(), pa.large_string()), (pa.binary(), pa.large_binary())):
        if {a, b} == {small, large}:
            return large
    return None


def unify(planned: pa.Schema | None, files: dict[str, pa.Schema], cols: Columns) -> pa.Schema:
    """The output schema of the id and passthrough columns over `files` (already checked) and the files planned
    before them, whose schema `planned` is and must stay: their parts are written."""
    fields = []
    for c in cols.output:
        if planned is not None:
            have, where = planned.field(c).type, "the files planned before"
        else:
            have, where = None, None
        for file, schema in files.items():
            t = schema.field(c).type
            common = t if have is None else _common(have, t)
            if common is None:
                raise PlanError(f"input column '{c}' is {have} in {where} but {t} in {file}; "
                                "cast one of them (an output column has one type)")
            if planned is not None and common != planned.field(c).type:
                raise PlanError(f"input column '{c}' is {t} in {file}, wider than the {have} of {where}; cast it "
                                "to that, or rerun with --restart to plan every file again")
            if common != have:
                have, where = common, file
        fields.append(pa.field(c, have))
    return pa.schema(fields)


def cast_to(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """The table with the columns that `schema` names cast to its types (unify made these casts lossless)."""
    for f in schema:
        i = table.schema.get_field_index(f.name)
        if i >= 0 and table.schema.field(i).type != f.type:
            table = table.set_column(i, f, table.column(i).cast(f.type))
    return table


def encode(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def decode(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))
