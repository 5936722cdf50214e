"""Input formats behind one seam (base.Reader): Parquet files and WebDataset tar shards."""

from po_batch.data.readers.base import Reader
from po_batch.data.readers.parquet import ParquetReader
from po_batch.data.schema import Columns


def open_reader(inp) -> Reader:
    """The reader of config.py's InputConfig `inp` (its format already resolved)."""
    if inp.format == "webdataset":
        from po_batch.data.readers.wds import WdsReader  # webdataset takes a second to import: only when needed

        return WdsReader(tuple(inp.columns), inp.image_column is not None, tuple(inp.image_extensions),
                         inp.skip_failed)
    return ParquetReader(Columns(inp.id_column, inp.image_column, tuple(inp.columns)))
