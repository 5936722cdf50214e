"""The Store on an object store through fsspec (s3://, gs://, ...). A whole-object PUT is atomic there, so a part is
committed by writing it under its final name (the unit's marker, written next, is the commit); nothing is renamed.

S3's conditional writes -- If-None-Match: * on PutObject (create), If-Match on the ETag (replace_if) -- give
exclusive claims and the plan lock. An ETag is the hash of the bytes, so rewriting an object unchanged keeps it:
a claim's lease time lives inside the object (lease_in_object), making each heartbeat a new version that a
takeover conditional on the old one loses to. Stores without them (anything but s3:// today) have no claims:
their workers run with --shard I/N.
"""

import io
import json
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import fsspec

from po_batch.data.errors import PlanError
from po_batch.data.store import Entry, Fenced, Store, Writer, mtime

CONDITIONAL = ("s3", "s3a")  # fsspec protocols whose conditional PUTs po-batch uses (s3fs)
# The plan lock: a holder that stops heartbeating (killed) is taken over after LOCK_TTL_S, by the store's clock
# against the taker's: clocks must agree within that
LOCK_TTL_S = 60.0
LOCK_BEAT_S = 10.0
SEGMENTS = ".segments"  # the folder of an appended object's segments, one per process
PUBLISH_TRIES = 5  # conditional PUTs of a part that other writers' PUTs beat in between, before giving up


def _refused(e: OSError) -> bool:
    """Whether a conditional write failed its condition (S3: 412, or 409 while another conditional write of the
    object is in flight), as opposed to failing."""
    code = getattr(e.__cause__, "response", {}).get("Error", {}).get("Code")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _version(info: dict) -> str:
    """S3's ETag, which its conditional writes compare; elsewhere what the backend has (GCS: a generation)."""
    for k in ("ETag", "etag", "generation"):
        if info.get(k) is not None:
            return str(info[k])
    return f"{info['size']}-{mtime(info)}"


class FsspecWriter(Writer):
    """Buffers the part in memory (a part is one unit's rows) and PUTs it whole at commit: with conditional writes,
    only over what was there before the check, so that a writer stopped between its check and its PUT cannot replace
    the part that a newer run or the unit's new owner published meanwhile. Without them there is no such fence."""

    def __init__(self, store: "FsspecStore", name: str):
        self.store, self.name = store, name
        self.file = io.BytesIO()

    def commit(self, check: Callable[[], None] | None = None) -> None:
        data = self.file.getvalue()
        if not self.store.conditional:
            if check is not None:
                check()
            self.store.put(self.name, data)
            return
        for _ in range(PUBLISH_TRIES):
            seen = self.store.stat(self.name)
            if check is not None:
                check()
            if (self.store.create(self.name, data) if seen is None
                    else self.store.replace_if(self.name, seen.version, data)):
                return
            # another writer published the part in between; the check, again, says whether this one still may
        raise Fenced(f"{self.store.root}/{self.name}: other writers published it at each of {PUBLISH_TRIES} tries")

    def __exit__(self, *exc) -> None:
        self.file.close()  # nothing was sent unless commit did


class FsspecStore(Store):
    lease_in_object = True

    def __init__(self, url: str):
        # listings must be live: other workers write the same prefix
        self.fs, path = fsspec.core.url_to_fs(url, use_listings_cache=False)
        self.root, self.base = url.rstrip("/"), path.rstrip("/")
        self.conditional = any(p in CONDITIONAL for p in ([self.fs.protocol] if isinstance(self.fs.protocol, str)
                                                          else self.fs.protocol))
        self.sid = secrets.token_hex(6)  # this process's segment of each appended object (see append)
        self.appended: dict[str, bytearray] = {}
        self.append_lock = threading.Lock()

    def _path(self, name: str) -> str:
        return f"{self.base}/{name}" if name else self.base

    def _put(self, name: str, data: bytes, **cond) -> str:
        """PUT; the new version."""
        out = self.fs.pipe_file(self._path(name), data, **cond)
        return out["ETag"] if isinstance(out, dict) and "ETag" in out else _version(self.fs.info(self._path(name)))

    def _need_conditional(self) -> None:
        if not self.conditional:
            raise PlanError(f"output {self.root}: po-batch has no conditional writes on this store, which claims "
                            "need; run the workers with --shard I/N")

    def put(self, name: str, data: bytes) -> None:
        self._put(name, data)

    def create(self, name: str, data: bytes) -> bool:
        return self._put_if(name, data, mode="create")

    def replace_if(self, name: str, version: str, data: bytes) -> bool:
        return self._put_if(name, data, IfMatch=version)

    def _put_if(self, name: str, data: bytes, **condition) -> bool:
        """A conditional PUT: False when the store refuses it (the object exists, changed or went)."""
        self._need_conditional()
        try:
            self._put(name, data, **condition)
        except (FileExistsError, FileNotFoundError):
            return False
        except OSError as e:
            if _refused(e):
                return False
            raise
        return True

    def read(self, name: str) -> bytes:
        try:
            return self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            segments = sorted(self.names(f"{name}{SEGMENTS}"))  # a missing object costs a listing of a folder
            if not segments:                                       # that is small or absent
                raise
        return b"".join(self.fs.cat_file(self._path(f"{name}{SEGMENTS}/{s}")) for s in segments)

    def append(self, name: str, data: bytes) -> None:
        """An object store has no append: each process writes its own segment of the object
        (`name.segments/<id>`), whole, and `read` joins the segments. A segment grows with one process's appends."""
        with self.append_lock:
            buf = self.appended.setdefault(name, bytearray())
            buf += data
            self.put(f"{name}{SEGMENTS}/{self.sid}", bytes(buf))

    def names(self, folder: str) -> list[str]:
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._path(folder), detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def list(self, folder: str) -> list[Entry]:
        try:
            infos = self.fs.ls(self._path(folder), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [self._entry(i) for i in infos if i["type"] == "file"]

    @staticmethod
    def _entry(info: dict) -> Entry:
        return Entry(info["name"].rsplit("/", 1)[-1], info["size"], mtime(info), _version(info))

    def stat(self, name: str) -> Entry | None:
        try:
            info = self.fs.info(self._path(name))
        except FileNotFoundError:
            return None
        return self._entry(info) if info["type"] == "file" else None

    def delete(self, name: str) -> bool:
        path = self._path(name)
        try:
            if self.fs.info(path)["type"] == "directory":
                self.fs.rm(path, recursive=True)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True

    def touch(self, name: str) -> bool:
        """Rewrites the object as it is: its mtime moves, its version (the ETag) does not."""
        try:
            self.put(name, self.fs.cat_file(self._path(name)))
        except FileNotFoundError:
            return False
        return True

    def open_writer(self, name: str) -> FsspecWriter:
        return FsspecWriter(self, name)

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """A lease: created if absent, taken over once its holder has not renewed it for LOCK_TTL_S, renewed every
        LOCK_BEAT_S while held, deleted on release. Without conditional writes there is no lock (the README says to
        plan with one worker before starting the others)."""
        if not self.conditional:
            yield
            return
        owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

        def lease() -> bytes:
            return json.dumps({"owner": owner, "lease": time.time()}).encode()

        version = self._acquire(name, lease)
        stop = threading.Event()

        def renew():
            nonlocal version
            while not stop.wait(LOCK_BEAT_S):
                try:
                    version = self._put(name, lease(), IfMatch=version)
                except OSError:  # taken over (we were stalled) or unreachable: the plan write will tell
                    return

        beat = threading.Thread(target=renew, name="po-batch-plan-lock", daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            entry = self.stat(name)
            if entry is not None and entry.version == version:
                self.delete(name)

    def _acquire(self, name: str, lease: Callable[[], bytes]) -> str:
        """Our version of the lock, once we hold it."""
        while True:
            try:
                return self._put(name, lease(), mode="create")
            except FileExistsError:
                pass
            except Exception as e:  # an unknown bucket, no credentials (botocore's own errors too)
                if not (isinstance(e, OSError) and _refused(e)):
                    raise PlanError(f"output {self.root} is not writable ({type(e).__name__}: {e})") from None
            entry = self.stat(name)
            if entry is not None and time.time() - entry.mtime > LOCK_TTL_S:
                try:
                    return self._put(name, lease(), IfMatch=entry.version)
                except OSError as e:  # renewed, taken or released meanwhile
                    if not (isinstance(e, FileNotFoundError) or _refused(e)):
                        raise
            time.sleep(random.uniform(0.1, 0.5))

    def sweep(self, folder: str, older_than: float) -> None:
        """Nothing to sweep: a part is buffered in memory until its PUT, which is whole or nothing."""
