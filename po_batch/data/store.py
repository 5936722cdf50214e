"""Where po-batch keeps its output: parts, plan, claims and markers. Plan, claims, sink and status reach the output
only through a Store, so that an object store can stand in for the local filesystem.

The contract is what an object store can also keep: whole-object puts, create-if-absent, replace-if-unchanged
(a version per object) and a writer whose `commit` publishes a part at once. Rename is the local store's way to
get there, not part of the contract. Names are '/'-separated and relative to the store's root.
"""

import fcntl
import os
import re
import secrets
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

from po_batch.data.errors import PlanError, backend_error

# what LocalStore leaves behind when a process dies mid-write or mid-takeover (see sweep), and nothing a user
# would name a file
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$|^.+\.[0-9a-f]{12}\.tomb$")


class Fenced(OSError):
    """A publish refused because of what happened after its check: the writer's temporary was removed (a --restart's
    wipe, while the process stood between its check and its rename), or another writer published the part between
    this one's look and its PUT (an object store's conditional write). Nothing was published."""


@dataclass(frozen=True)
class Entry:
    name: str  # within the folder listed
    size: int
    mtime: float  # epoch seconds
    version: str  # changes whenever the object is rewritten, replaced or touched


class Writer(AbstractContextManager):
    """A part being written: `file` takes the bytes, `commit` publishes them under the final name at once;
    leaving the `with` block without a commit discards them."""

    file: BinaryIO

    @abstractmethod
    def commit(self, check: Callable[[], None] | None = None) -> None:
        """Publish. `check` runs at the last moment before the part becomes visible; if it raises, nothing is
        published and its exception propagates. A writer stopped (SIGSTOP) between its check and the publish does not
        replace what a newer run or the unit's new owner published meanwhile where the store can tell: Fenced."""


class Store(ABC):
    root: str
    # create and replace_if are exclusive between processes (claims need that; without it, workers use --shard)
    conditional: bool = True
    # touch does not move the version (an object store's ETag hashes the bytes): a heartbeat must rewrite the
    # object with its lease time inside instead
    lease_in_object: bool = False

    @abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Write the whole object; readers see the old one or the new one, even after a crash."""

    @abstractmethod
    def create(self, name: str, data: bytes) -> bool:
        """Write the object only if no object has that name; False if one has."""

    @abstractmethod
    def replace_if(self, name: str, version: str, data: bytes) -> bool:
        """Replace the object only if it is still at `version` (as stat saw it); False if it changed or went."""

    @abstractmethod
    def read(self, name: str) -> bytes:
        """The object's bytes; FileNotFoundError if there is none."""

    @abstractmethod
    def append(self, name: str, data: bytes) -> None:
        """Add bytes at the end (creating the object). Not atomic: a crash can leave a torn tail, and concurrent
        appenders on some shared filesystems can garble each other; readers must tolerate both."""

    @abstractmethod
    def names(self, folder: str) -> list[str]:
        """Names directly inside folder, objects and sub-folders alike, without their stats; [] if none."""

    @abstractmethod
    def list(self, folder: str) -> list[Entry]:
        """The objects directly inside folder, with their stats; [] if none."""

    @abstractmethod
    def stat(self, name: str) -> Entry | None:
        """None if there is no such object."""

    def exists(self, name: str) -> bool:
        return self.stat(name) is not None

    @abstractmethod
    def delete(self, name: str) -> bool:
        """Remove an object, or a folder with everything in it; False if there was nothing."""

    @abstractmethod
    def touch(self, name: str) -> bool:
        """Set the object's mtime to now (a heartbeat); False if it is gone."""

    @abstractmethod
    def open_writer(self, name: str) -> Writer: ...

    @abstractmethod
    def lock(self, name: str) -> AbstractContextManager:
        """Exclusive between processes for the `with` block; raises PlanError when the output cannot be written."""

    @abstractmethod
    def sweep(self, folder: str, older_than: float) -> None:
        """Remove the temporaries this store's writers and takeovers left in folder before `older_than`
        (epoch seconds)."""


def open_store(url: str) -> Store:
    """The store of an output path or URL; a one-line PlanError for a URL that cannot be an output."""
    if "://" not in url or url.startswith("file://"):
        return LocalStore(url.removeprefix("file://"))
    import fsspec  # only here: status and local outputs start faster without it

    try:
        fsspec.get_filesystem_class(url.split("://", 1)[0])
    except (ImportError, ValueError) as e:
        raise backend_error("output", url, e) from None
    from po_batch.data.objstore import FsspecStore

    return FsspecStore(url)


def mtime(info: dict) -> float | None:
    """An fsspec info's modification time as epoch seconds, whatever the backend calls it."""
    v = info.get("mtime", info.get("LastModified", info.get("created")))
    return v.timestamp() if isinstance(v, datetime) else v


def _version(st: os.stat_result) -> str:
    return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open(path: str, flags: int) -> int:
    """os.open, making the missing parent folders."""
    try:
        return os.open(path, flags, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, flags, 0o644)


class LocalWriter(Writer):
    """Writes beside the final name (dot-prefixed, so pyarrow.dataset skips it), fsyncs, renames."""

    def __init__(self, path: str):
        self.path = path
        folder, name = os.path.split(path)
        self.tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        self.file = os.fdopen(_open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb")
        self.committed = False

    def commit(self, check: Callable[[], None] | None = None) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if check is not None:
            check()
        try:
            os.replace(self.tmp, self.path)
        except FileNotFoundError:  # _wipe removes temporaries: a run that replaced the plan came in since the check
            raise Fenced(f"{self.path}: its temporary was removed before the rename") from None
        self.committed = True
        _fsync_dir(os.path.dirname(self.path))  # the rename must be on disk before anything that counts on it

    def __exit__(self, *exc) -> None:
        if not self.committed:
            try:
                self.file.close()  # on a full disk, flushing what is buffered fails again
            except OSError:
                pass
            try:
                os.remove(self.tmp)
            except FileNotFoundError:
                pass


class LocalStore(Store):
    """A local or shared-filesystem directory (NFS, Lustre, GPFS: anything with atomic create and rename)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name) if name else self.root

    def put(self, name: str, data: bytes) -> None:
        with self.open_writer(name) as w:
            w.file.write(data)
            w.commit()

    def create(self, name: str, data: bytes) -> bool:
        path = self._path(name)
        try:
            fd = _open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except BaseException:
            os.remove(path)  # a disk that filled up must not leave an empty object claiming the name
            raise
        return True

    def replace_if(self, name: str, version: str, data: bytes) -> bool:
        # Only one process can rename the object away. A slower one may instead rename an object created just
        # after that, so check what was renamed and put it back if it is not the version asked for.
        path = self._path(name)
        tomb = f"{path}.{secrets.token_hex(6)}.tomb"
        try:
            os.rename(path, tomb)
        except FileNotFoundError:
            return False
        try:
            if _version(os.stat(tomb)) != version:
                try:
                    os.link(tomb, path)  # never overwrites an object created in between
                except FileExistsError:
                    pass
                os.remove(tomb)
                return False
            os.remove(tomb)
        except FileNotFoundError:  # swept meanwhile (it was old): leave the name to a later try
            return False
        return self.create(name, data)

    def read(self, name: str) -> bytes:
        with open(self._path(name), "rb") as f:
            return f.read()

    def append(self, name: str, data: bytes) -> None:
        fd = _open(self._path(name), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def names(self, folder: str) -> list[str]:
        try:
            return os.listdir(self._path(folder))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def list(self, folder: str) -> list[Entry]:
        try:
            entries = list(os.scandir(self._path(folder)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for e in entries:
            try:
                if e.is_file():
                    st = e.stat()
                    out.append(Entry(e.name, st.st_size, st.st_mtime, _version(st)))
            except FileNotFoundError:
                pass
        return out

    def stat(self, name: str) -> Entry | None:
        try:
            st = os.stat(self._path(name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return Entry(os.path.basename(name), st.st_size, st.st_mtime, _version(st))

    def delete(self, name: str) -> bool:
        path = self._path(name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except FileNotFoundError:
            return False
        return True

    def touch(self, name: str) -> bool:
        try:
            os.utime(self._path(name))
        except FileNotFoundError:
            return False
        return True

    def open_writer(self, name: str) -> LocalWriter:
        return LocalWriter(self._path(name))

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        try:
            fd = _open(self._path(name), os.O_RDWR | os.O_CREAT)
        except OSError as e:
            if os.path.isfile(self.root):
                raise PlanError(f"output {self.root} is a file, not a directory") from None
            raise PlanError(f"output {self.root} is not writable ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def sweep(self, folder: str, older_than: float) -> None:
        for e in self.list(folder):
            if _TEMPORARY.match(e.name) and e.mtime < older_than:
                self.delete(f"{folder}/{e.name}" if folder else e.name)
