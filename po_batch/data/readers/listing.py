"""Input paths to input files: local paths, directories, globs, brace patterns (`shards-{00000..00999}.tar`) and
fsspec URLs, whatever the format."""

import os

import braceexpand
import fsspec
from fsspec.implementations.local import LocalFileSystem

from po_batch.data.errors import PlanError, backend_error
from po_batch.data.layout import STATE_DIR


def _hidden(rel: str) -> bool:
    # same convention as pyarrow.dataset: '_SUCCESS', '.tmp' files and '_po_batch/' are not data
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def list_inputs(paths: list[str], exclude: str | None = None, extensions: tuple[str, ...] = (".parquet",)) -> list[str]:
    """Files, directories (every file with one of `extensions` inside, recursively), globs, brace patterns and
    fsspec URLs; sorted, unique.

    Local files come back as absolute paths, remote ones as URLs with their protocol. Nothing under `exclude`
    (the output directory) and nothing in a po-batch state folder is listed, whatever the globs say. Every file a
    brace pattern names must exist (a missing shard is named); a glob need only match one."""
    found = set()
    for path in paths:
        try:
            fs, _ = fsspec.core.url_to_fs(path)
        except (ImportError, ValueError) as e:
            raise backend_error("input", path, e) from None
        local = isinstance(fs, LocalFileSystem)
        expanded = list(braceexpand.braceexpand(path))
        matches = []
        for one in expanded:
            p = fsspec.core.url_to_fs(one)[1]
            if any(c in p for c in "*?["):
                for m in fs.glob(p):
                    matches += _in(fs, m, extensions) if fs.isdir(m) else [m]
            elif fs.isdir(p):
                inside = _in(fs, p, extensions)
                if not inside:
                    raise PlanError(f"input directory {one} holds no {' or '.join(extensions)} files")
                matches += inside
            elif fs.exists(p):
                matches.append(p)
            elif len(expanded) > 1:
                raise PlanError(f"input {path}: {one} does not exist")
        matches = [os.path.normpath(m) if local else fs.unstrip_protocol(m) for m in matches]
        matches = [m for m in matches if not _ours(m, exclude)]
        if not matches:
            raise PlanError(f"input {path} matches no file")
        found.update(matches)
    return sorted(found)


def _ours(file: str, out_dir: str | None) -> bool:
    if STATE_DIR in file.split("/"):
        return True
    if not out_dir:
        return False
    if "://" in out_dir or "://" in file:
        return file.rstrip("/").startswith(out_dir.rstrip("/") + "/")
    return os.path.realpath(file).startswith(os.path.realpath(out_dir) + os.sep)


def _in(fs, folder: str, extensions: tuple[str, ...]) -> list[str]:
    return [f for f in fs.find(folder) if f.endswith(extensions) and not _hidden(f[len(folder):])]
