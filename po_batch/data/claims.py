"""Workers claim units by atomically creating OUT/_po_batch/claims/{unit}.claim; claims not refreshed within ttl expire.

Claims only avoid duplicate work: exactly-once output comes from the sink's deterministic part names,
so a unit that two workers both ran (after a clock jump, a suspended worker) is still written once.
"""

import os
import secrets
import socket
import threading
import time

from po_batch.data.plan import claims_dir
from po_batch.data.sink import is_done


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Claims:
    def __init__(self, out_dir: str, owner: str, ttl_s: float = 300.0):
        self.dir = claims_dir(out_dir)
        self.owner = owner
        self.ttl_s = ttl_s
        self._held: set[str] = set()
        self._lock = threading.Lock()  # _held is shared with the heartbeat thread
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        os.makedirs(self.dir, exist_ok=True)

    def _path(self, unit_id: str) -> str:
        return os.path.join(self.dir, f"{unit_id}.claim")

    def _create(self, unit_id: str) -> bool:
        try:
            fd = os.open(self._path(unit_id), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self.owner)
        with self._lock:
            self._held.add(unit_id)
        return True

    def try_claim(self, unit_id: str) -> bool:
        if self._create(unit_id):
            return True
        path = self._path(unit_id)
        try:
            st = os.stat(path)
        except FileNotFoundError:  # released or taken over meanwhile: not ours to grab now
            return False
        if not self._stale(path, st):
            return False
        # Only one process can rename the stale file away. A slower one may instead rename the fresh
        # claim the winner just made, so check what we got and give it back if it is not the stale one.
        tomb = f"{path}.{secrets.token_hex(6)}.tomb"
        try:
            os.rename(path, tomb)
        except FileNotFoundError:
            return False
        try:
            got = os.stat(tomb)
            if got.st_ino != st.st_ino or not self._stale(tomb, got):
                try:
                    os.link(tomb, path)  # never overwrites a claim made in between
                except FileExistsError:
                    pass
                os.remove(tomb)
                return False
            os.remove(tomb)
        except FileNotFoundError:  # swept by clean_orphans (it was old): leave the unit to a later try
            return False
        return self._create(unit_id)

    def _stale(self, path: str, st: os.stat_result) -> bool:
        """Not heartbeated within ttl, or held by a process of this host that no longer exists (a SIGKILLed
        worker's claim is taken over at once by the next run on the same machine, without waiting for ttl)."""
        if time.time() - st.st_mtime > self.ttl_s:
            return True
        try:
            with open(path) as f:
                host, pid, _ = f.read().split(":")
        except (OSError, ValueError):
            return False
        if host != socket.gethostname() or int(pid) == os.getpid():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, owned by another user
            pass
        return False

    def holds(self, unit_id: str) -> bool:
        """Whether the claim file still names this owner (false once another worker took it over)."""
        try:
            with open(self._path(unit_id)) as f:
                return f.read() == self.owner
        except FileNotFoundError:
            return False

    def heartbeat(self) -> None:
        with self._lock:
            held = list(self._held)
        for unit_id in held:
            if self.holds(unit_id):
                try:
                    os.utime(self._path(unit_id))
                except FileNotFoundError:
                    pass

    def release(self, unit_id: str) -> None:
        with self._lock:
            self._held.discard(unit_id)
        if self.holds(unit_id):
            try:
                os.remove(self._path(unit_id))
            except FileNotFoundError:
                pass

    def release_all(self) -> None:
        with self._lock:
            held = list(self._held)
        for unit_id in held:
            self.release(unit_id)

    def start_heartbeat(self, interval_s: float) -> None:
        self.stop_heartbeat()
        stop = self._stop = threading.Event()

        def beat():
            while not stop.wait(interval_s):
                self.heartbeat()

        self._thread = threading.Thread(target=beat, name="po-batch-claims-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


def drop_done_claims(out_dir: str) -> None:
    """Remove claims on committed units: a worker killed between its commit and its release leaves one behind,
    and no later run visits a done unit to take it over. A live owner does not mind: its release finds nothing."""
    try:
        names = os.listdir(claims_dir(out_dir))
    except FileNotFoundError:
        return
    for name in names:
        if name.endswith(".claim") and is_done(out_dir, name.removesuffix(".claim")):
            try:
                os.remove(os.path.join(claims_dir(out_dir), name))
            except FileNotFoundError:
                pass


def claimed_units(out_dir: str, ttl_s: float) -> set[str]:
    """Units whose claim was refreshed within ttl_s."""
    try:
        entries = list(os.scandir(claims_dir(out_dir)))
    except FileNotFoundError:
        return set()
    now, live = time.time(), set()
    for e in entries:
        if not e.name.endswith(".claim"):
            continue
        try:
            if now - e.stat().st_mtime <= ttl_s:
                live.add(e.name.removesuffix(".claim"))
        except FileNotFoundError:
            pass
    return live
