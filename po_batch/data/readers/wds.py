"""WebDataset inputs: tar shards streamed through fsspec, members read as bytes and never extracted (tar.py walks an
uncompressed shard, webdataset's tar iteration a compressed one). A shard is one unit. A sample is a run of adjacent
members sharing a key (webdataset's rule: the member path up to the first dot of its base name); its id is
`__key__`, its image the member whose last extension is an image extension, its columns the fields of its `.json`
members and the text of its `.txt`/`.cls` members.

With img2dataset's `<shard>.parquet` beside a shard, that file's keys are the shard's rows (failed downloads
too, unless skip_failed), so a truncated tar yields an error row per key it lost; without one, the shard's rows are
the keys of its whole members, counted from the tar's headers when it is planned."""

import hashlib
import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from po_batch.data.errors import PlanError
from po_batch.data.readers.base import Batch, Reader, ReadError, Unit, UnitReadError
from po_batch.data.readers.parquet import read_identity
from po_batch.data.readers.tar import TarCut, members
from po_batch.data.schema import Columns
from po_batch.data.store import mtime

KEY = "__key__"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "cls")
SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
TAIL_BYTES = 1 << 16  # the identity hashes the shard's last 64 KiB: a rewrite moves the end blocks' neighbours
BATCH_ROWS = 256
EXAMPLES = 5  # keys named in a marker's note; the count says how many there are
# what webdataset's tar iteration skips: '__meta__'-style names
_META = re.compile(r"__[^/]*__($|/)")
# the damage a compressed tar can have; an OSError instead is the storage failing, and fails the unit
_DAMAGE = (tarfile.TarError, EOFError, zlib.error)
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


@contextmanager
def _open(fs, path: str, size: int | None = None) -> Iterator[Iterator[tuple[str, bytes]]]:
    """The shard's regular members as (name, data), raising TarCut where it breaks; with `size`, the headers
    of an uncompressed shard only (data empty)."""
    with fs.open(path, "rb") as f:
        compressed = f.read(6).startswith(_COMPRESSED)
        f.seek(0)
        yield _inflated(f) if compressed else members(f, size)


def _inflated(f) -> Iterator[tuple[str, bytes]]:
    try:
        for m in tar_file_iterator(f):
            yield m["fname"], m["data"]
    except _DAMAGE as e:
        raise TarCut(f"the compressed tar is cut short or damaged: {str(e).split(' @ ')[0]}") from None


def _part(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member that belongs to a sample, as webdataset splits it; None for one it skips."""
    if "__" in name and (("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name)):
        return None
    key, ext = base_plus_ext(name)
    return None if key is None else (key, ext)


def _last(ext: str) -> str:
    return ext[ext.rfind(".") + 1:].lower()


def _stem(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return next(name[: -len(x)] for x in SHARD_EXTENSIONS if name.endswith(x))


def sidecar_of(path: str) -> str:
    """img2dataset's per-shard Parquet: `00000.parquet` beside `00000.tar`."""
    return f"{path.rsplit('/', 1)[0]}/{_stem(path)}.parquet" if "/" in path else f"{_stem(path)}.parquet"


def _text(v) -> str | None:
    # one output schema over shards whose JSON is untyped: every column is a string; other JSON values keep
    # their JSON text
    return v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def _few(keys: list[str]) -> str:
    return ", ".join(map(repr, keys[:EXAMPLES])) + (f" and {len(keys) - EXAMPLES} more" if len(keys) > EXAMPLES else "")


class WdsReader(Reader):
    extensions = SHARD_EXTENSIONS

    def __init__(self, passthrough: tuple[str, ...] = (), images: bool = True,
                 image_extensions: tuple[str, ...] = IMAGE_EXTENSIONS, skip_failed: bool = False):
        self.columns = Columns(KEY, None, tuple(passthrough))
        self.images, self.image_extensions, self.skip_failed = images, frozenset(image_extensions), skip_failed
        self.schema = pa.schema([(c, pa.string()) for c in self.columns.output])

    # --- planning ------------------------------------------------------------------------------

    def describe(self, file: str, rows_per_unit: int) -> tuple[dict, pa.Schema]:
        """A shard is one unit whatever rows_per_unit says: its rows are the keys of its sidecar, or of its whole
        members (the headers are read; on object storage that reads most of the shard)."""
        fs, p = fsspec.core.url_to_fs(file)
        try:
            info = fs.info(p)
            entry = {"path": file, "size": info["size"], "mtime": mtime(info), "footer": _tail_hash(fs, p, info)}
            side = sidecar_of(file)
            if fs.exists(sidecar_of(p)):
                ident, _, _ = read_identity(side)
                entry["sidecar"] = {k: ident[k] for k in ("size", "mtime", "footer")}
                keys = list(self._listed(side))
            else:
                keys, truncated = _scan(fs, p, info["size"])
                if truncated:
                    entry["truncated"] = truncated
        except OSError as e:
            raise PlanError(f"cannot read tar shard {file}: {e}") from e
        entry |= {"rows": len(keys), "cuts": [0, len(keys)] if keys else []}
        if keys:
            entry["keys"] = [min(keys), max(keys)]
        return entry, self.schema

    def _sidecar(self, side: str, columns: list[str]) -> pa.Table:
        try:
            with fsspec.open(side, "rb") as f:
                names = pq.ParquetFile(f).schema_arrow.names
                if "key" not in names:
                    raise PlanError(f"{side} (beside the shard of that name) has no 'key' column; img2dataset writes "
                                    "key and status: move the file away if it is something else")
                table = pq.read_table(f, columns=[c for c in ["key", "status", "error_message", *columns]
                                                  if c in names])
        except pa.ArrowException as e:
            raise PlanError(f"cannot read {side}: {e}") from e
        return table

    def _listed(self, side: str, columns: list[str] = ()) -> dict[str, dict]:
        """key -> its sidecar row, for the keys that are rows: every key, or with skip_failed the downloaded ones."""
        rows = {}
        for r in self._sidecar(side, list(columns)).to_pylist():
            if r["key"] is not None and (not self.skip_failed or r.get("status", "success") == "success"):
                rows.setdefault(str(r["key"]), r)
        return rows

    def changed(self, entry: dict) -> str | None:
        fs, p = fsspec.core.url_to_fs(entry["path"])
        try:
            info = fs.info(p)
        except FileNotFoundError:
            return "it is gone"
        what = []
        if (info["size"], mtime(info)) != (entry["size"], entry["mtime"]):
            if info["size"] != entry["size"]:
                what.append(f"size {entry['size']} -> {info['size']}")
            elif _tail_hash(fs, p, info) != entry["footer"]:
                what.append("its last 64 KiB differ")
        side, had = sidecar_of(entry["path"]), entry.get("sidecar")
        if not fs.exists(sidecar_of(p)):
            if had:
                what.append(f"{side} is gone")
        elif not had:
            what.append(f"{side} appeared beside it")
        else:
            info = fs.info(sidecar_of(p))
            if (info["size"], mtime(info)) != (had["size"], had["mtime"]):
                try:
                    now, _, _ = read_identity(side)
                except PlanError as e:
                    return f"{side} can no longer be read: {e}"
                if (now["size"], now["footer"]) != (had["size"], had["footer"]):
                    what.append(f"{side} changed")
        return ", ".join(what) or None

    def link(self, planned: list[dict], new: list[dict]) -> None:
        """The shard name goes before the keys of a new shard whose key range overlaps another shard's (keys that
        restart in every shard); img2dataset's keys, unique across shards, stay as they are. Comparing ranges
        needs two keys per shard in the plan, where comparing keys would need them all."""
        spans = [(*_ids(e), e) for e in planned if "keys" in e]
        fresh = [e for e in new if "keys" in e]
        for e in _overlapping(spans + [(*e["keys"], e) for e in fresh], fresh):
            e["prefix"] = _stem(e["path"])
        both = spans + [(*_ids(e), e) for e in fresh]
        for a, b in _pairs(both, fresh):
            raise PlanError(f"input {a['path']}: its keys overlap those of {b['path']} even with the shard name "
                            "before them; rename one of the shards")

    # --- reading -------------------------------------------------------------------------------

    def read(self, unit: Unit, entry: dict) -> Iterator[Batch]:
        try:
            yield from _ShardRead(self, unit, entry).batches()
        except OSError as e:
            raise UnitReadError(unit, f"{type(e).__name__}: {e}") from e

    def sample(self, key: str, parts: list[tuple[str, bytes]]) -> tuple[bytes | None, dict, ReadError | None]:
        """(image, fields, error) of one sample's members, as (extension, data); the fields are the passthrough
        columns the sample has."""
        fields, texts, images, error = {}, {}, [], None
        for ext, data in parts:
            last = _last(ext)
            if last == "json":
                try:
                    doc = json.loads(data)
                except ValueError as e:
                    error = error or ReadError("corrupt", f"{key}.{ext} is not valid JSON ({e})")
                    continue
                if not isinstance(doc, dict):
                    error = error or ReadError("corrupt", f"{key}.{ext} is not a JSON object")
                    continue
                fields |= {c: _text(doc[c]) for c in self.columns.passthrough if c in doc}
            elif last in TEXT_EXTENSIONS:
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    error = error or ReadError("corrupt", f"{key}.{ext} is not UTF-8 text")
                    continue
                texts[ext] = text.strip() if last == "cls" else text  # a class label, as webdataset reads it
            elif last in self.image_extensions:
                images.append(data)
        fields |= texts  # a member's text wins over a JSON field of the same name
        if not self.images:
            return None, fields, error
        if len(images) == 1:
            return images[0], fields, error
        has = ", ".join(f".{ext}" for ext, _ in parts)
        if not images:
            wanted = "/".join(f".{x}" for x in sorted(self.image_extensions))
            return None, fields, error or ReadError("missing", f"sample {key} has no image member ({wanted}); "
                                                               f"it has {has}")
        return None, fields, error or ReadError("ambiguous", f"sample {key} has several image members ({has}); "
                                                             "narrow input.image_extensions")


class _ShardRead:
    """One pass over one shard: members grouped into samples, samples into rows, rows into batches."""

    def __init__(self, reader: WdsReader, unit: Unit, entry: dict):
        self.reader, self.unit, self.entry = reader, unit, entry
        self.name = unit.file.rsplit("/", 1)[-1]
        self.prefix = entry.get("prefix")
        self.listed = None  # key -> sidecar row, when the shard has one
        self.at = {}  # key -> (its row, its member extensions)
        self.rows = []  # (id, image, fields) not yet handed on
        self.handed = 0  # rows handed on
        self.errors, self.notes = {}, {}
        self.unlisted, self.ignored, self.repeated = [], 0, set()

    def batches(self) -> Iterator[Batch]:
        fs, p = fsspec.core.url_to_fs(self.unit.file)
        if "sidecar" in self.entry:
            self.listed = self.reader._listed(sidecar_of(self.unit.file), self.reader.columns.passthrough)
            if len(self.listed) != self.unit.rows:
                raise PlanError(f"{sidecar_of(self.unit.file)} lists {len(self.listed)} keys but unit "
                                f"{self.unit.id} has {self.unit.rows}; it changed after it was planned")
        key, group = None, []
        with _open(fs, p) as tar:
            try:
                for name, data in tar:
                    part = _part(name)
                    if part is None:
                        self.ignored += 1
                        continue
                    if part[0] != key and group:
                        self.add(key, group)
                        yield from self.flush(keep=1)
                    if part[0] != key:
                        key, group = part[0], []
                    group.append((part[1], data))
            except TarCut as e:
                self.notes["truncated"] = str(e)
        if group:
            self.add(key, group)
        self.finish()
        yield from self.flush(keep=0)

    def id(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def add(self, key: str, parts: list[tuple[str, bytes]]) -> None:
        exts = [ext for ext, _ in parts]
        kinds = set(exts)
        if key in self.at:
            self.repeated.add(key)
            row, seen = self.at[key]
            if kinds & seen:
                err = ReadError("duplicate_key", f"key {key} appears more than once in {self.name}; which sample "
                                                 "it names is ambiguous")
            else:
                err = ReadError("split_key", f"the members of key {key} are not adjacent in {self.name} "
                                             f"({', '.join(f'.{x}' for x in exts)} come after other keys)")
            self.errors.setdefault(row, err)
            seen |= kinds
            return
        if self.listed is not None and key not in self.listed:
            self.unlisted.append(key)
            return
        row = len(self.at)
        if row >= self.unit.rows:
            raise PlanError(f"{self.unit.file} has more samples than the {self.unit.rows} planned; it changed after "
                            "it was planned")
        self.at[key] = (row, kinds)
        if len(exts) != len(kinds):
            self.errors[row] = ReadError("duplicate_key", f"key {key} has two members of one extension in a row "
                                                          f"in {self.name} ({', '.join(f'.{x}' for x in exts)})")
        image, fields, error = self.reader.sample(key, parts)
        if error is not None:
            self.errors.setdefault(row, error)
        self.rows.append((self.id(key), image, fields))

    def finish(self) -> None:
        """The rows of listed keys the tar did not hold, and the notes for the unit's marker."""
        if self.listed is not None:
            lost = []
            for key, r in self.listed.items():
                if key in self.at:
                    continue
                row = len(self.at)
                self.at[key] = (row, set())
                status = r.get("status", "success")
                if status == "success":
                    lost.append(key)
                    err = ReadError("missing", f"key {key} is listed as downloaded in "
                                               f"{sidecar_of(self.unit.file)} but is not in the tar")
                else:
                    err = ReadError("download", f"{status}: {r.get('error_message') or 'no message'}")
                self.errors[row] = err
                fields = {c: _text(r[c]) for c in self.reader.columns.passthrough if c in r}
                self.rows.append((self.id(key), None, fields))
            if lost:
                self.notes["missing_keys"] = f"{len(lost)} listed keys are not in the tar: {_few(lost)}"
            if self.unlisted:
                self.notes["unlisted_keys"] = (f"{len(self.unlisted)} samples of the tar are not rows of "
                                               f"{sidecar_of(self.unit.file)} (not listed, or failed with "
                                               f"skip_failed): {_few(self.unlisted)}")
        elif "truncated" in self.entry:
            self.notes.setdefault("truncated", self.entry["truncated"])
        if len(self.at) != self.unit.rows:
            raise PlanError(f"{self.unit.file} has {len(self.at)} samples but unit {self.unit.id} has "
                            f"{self.unit.rows}; it changed after it was planned")
        if self.ignored:
            self.notes["members_ignored"] = self.ignored
        if self.repeated:
            self.notes["repeated_keys"] = len(self.repeated)

    def flush(self, keep: int) -> Iterator[Batch]:
        """Hand on full batches, holding back `keep` rows: the unit's last batch must carry every error and note,
        and rows handed on before it could be committed before a later error about them arrives."""
        while self.rows and len(self.rows) - keep >= (BATCH_ROWS if keep else 1):
            n = min(BATCH_ROWS, len(self.rows) - keep)
            rows, self.rows = self.rows[:n], self.rows[n:]
            self.handed += n
            final = not keep and not self.rows
            errors = {i: e for i, e in self.errors.items() if final or i < self.handed}
            for i in errors:
                del self.errors[i]
            cols = {KEY: [r[0] for r in rows]}
            cols |= {c: [r[2].get(c) for r in rows] for c in self.reader.columns.passthrough}
            yield Batch(pa.RecordBatch.from_pydict(cols, schema=self.reader.schema), [r[1] for r in rows], errors,
                        dict(self.notes) if final else {})


def _scan(fs, path: str, size: int) -> tuple[list[str], str | None]:
    """The keys of a shard's whole members, in order, and why it ends early if it does: the members that reading
    it yields. An uncompressed shard's headers are read, its data seeked over."""
    keys, why, n = {}, None, 0
    with _open(fs, path, size) as tar:
        try:
            for n, (name, _) in enumerate(tar, 1):
                part = _part(name)
                if part is not None:
                    keys.setdefault(part[0])
        except TarCut as e:
            why = str(e)
    if why and not n:  # tarfile's "file could not be opened": an HTML error page, a zero-byte copy
        raise PlanError(f"cannot read tar shard {path}: {why}; it is no tar, or cut short before its first member")
    return list(keys), why


def _tail_hash(fs, path: str, info: dict) -> str:
    with fs.open(path, "rb") as f:
        f.seek(max(0, info["size"] - TAIL_BYTES))
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _ids(entry: dict) -> tuple[str, str]:
    lo, hi = entry["keys"]
    return (f"{entry['prefix']}/{lo}", f"{entry['prefix']}/{hi}") if "prefix" in entry else (lo, hi)


def _pairs(spans: list[tuple[str, str, dict]], of: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(entry of `of`, an entry whose span overlaps it), from one sort: a span overlaps an earlier one iff it
    starts before the furthest end so far, and a later one iff the next span starts before it ends."""
    spans = sorted(spans, key=lambda s: s[:2])
    mine = {id(e) for e in of}
    far = None  # the earlier span that ends furthest
    for k, (lo, hi, e) in enumerate(spans):
        other = far[2] if far is not None and far[1] >= lo else None
        if other is None and k + 1 < len(spans) and spans[k + 1][0] <= hi:
            other = spans[k + 1][2]
        if other is not None and (id(e) in mine or id(other) in mine):
            yield (e, other) if id(e) in mine else (other, e)
        if far is None or hi > far[1]:
            far = (lo, hi, e)


def _overlapping(spans: list[tuple[str, str, dict]], of: list[dict]) -> list[dict]:
    mine, found = {id(e) for e in of}, {}
    for a, b in _pairs(spans, of):
        found |= {id(e): e for e in (a, b) if id(e) in mine}
    return list(found.values())
