"""Workers claim units by atomically creating _po_batch/claims/{unit}.claim, naming the owner and the plan epoch;
claims not refreshed within ttl expire.

Claims avoid duplicate work, and the sink commits a unit only while its worker still holds the claim, so a worker
suspended past the ttl cannot commit over the worker that took its unit over. Exactly-once output itself comes
from the sink's deterministic part names.

A heartbeat touches the claim; on an object store, whose version is the hash of the bytes, it rewrites the claim
with its lease time inside, conditional on the version it read, so that a takeover decided on the old version
fails (Store.lease_in_object). Claims need exclusive create: a store without it refuses them (use --shard).
"""

import json
import os
import secrets
import socket
import threading
import time
from functools import cache

from po_batch.data.errors import PlanError
from po_batch.data.layout import CLAIMS_DIR, claim_name
from po_batch.data.markers import is_done
from po_batch.data.store import Entry, Store

# A claim that does not parse is one being written, or one a full disk left empty: stale after this long
# (or the ttl, if shorter), not only after the ttl.
UNREADABLE_GRACE_S = 30.0


@cache
def _machine() -> tuple[str, str]:
    """This kernel's boot id and this process's PID namespace: a pid means a process only within both."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "-"
    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = "-"
    return boot, ns


def default_owner() -> str:
    """host:pid:boot id:PID namespace:random; the random part tells apart two runs of one pid (pid reuse)."""
    return owner_prefix(os.getpid()) + secrets.token_hex(4)


def owner_prefix(pid: int) -> str:
    """What the owners of process `pid` of this host, boot and PID namespace start with."""
    return ":".join([socket.gethostname(), str(pid), *_machine(), ""])


def owner_dead(owner: str) -> bool:
    """Provably dead: its pid is gone from this host, this boot and this PID namespace. An owner elsewhere (another
    machine, a container with its own PID namespace and the host's name) is never judged from here."""
    try:
        host, pid, boot, ns, _ = owner.split(":")
        pid = int(pid)
    except ValueError:
        return False
    if (host, boot, ns) != (socket.gethostname(), *_machine()) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        pass
    return False


def _parse(raw: bytes) -> tuple[str, str] | None:
    """A claim's (owner, epoch); None if it does not parse (being written, or left empty by a full disk)."""
    try:
        doc = json.loads(raw)
        return doc["owner"], doc["epoch"]
    except (ValueError, TypeError, KeyError):
        return None


def claim_state(raw: bytes, entry: Entry, epoch: str, ttl_s: float, now: float) -> str:
    """'live', 'dead' (its owner provably died) or 'expired' (not heartbeated within ttl, unreadable past the grace
    period, or made for a replaced plan)."""
    age = now - entry.mtime
    parsed = _parse(raw)
    if parsed is None:
        return "expired" if age > min(UNREADABLE_GRACE_S, ttl_s) else "live"
    owner, claim_epoch = parsed
    if claim_epoch != epoch or age > ttl_s:
        return "expired"
    return "dead" if owner_dead(owner) else "live"


class Claims:
    def __init__(self, store: Store, owner: str, epoch: str, ttl_s: float = 300.0):
        if not store.conditional:
            raise PlanError(f"output {store.root}: this store has no exclusive create, which claims need; run the "
                            "workers with --shard I/N")
        self.store, self.owner, self.epoch, self.ttl_s = store, owner, epoch, ttl_s
        self._held: set[str] = set()
        self._lock = threading.Lock()  # _held is shared with the heartbeat thread
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def _hold(self, unit_id: str) -> bool:
        with self._lock:
            self._held.add(unit_id)
        return True

    def _doc(self) -> bytes:
        doc = {"owner": self.owner, "epoch": self.epoch}
        if self.store.lease_in_object:
            doc["lease"] = time.time()
        return json.dumps(doc, separators=(",", ":")).encode()

    def _mine(self, raw: bytes) -> bool:
        try:
            doc = json.loads(raw)
            return (doc["owner"], doc["epoch"]) == (self.owner, self.epoch)
        except (ValueError, TypeError, KeyError):
            return False

    def try_claim(self, unit_id: str) -> bool:
        name = claim_name(unit_id)
        if self.store.create(name, self._doc()):
            return self._hold(unit_id)
        entry = self.store.stat(name)
        if entry is None:  # released or taken over meanwhile: not ours to grab now
            return False
        try:
            raw = self.store.read(name)
        except FileNotFoundError:
            return False
        # replace_if fails if the claim changed since the stat (a heartbeat, another takeover)
        if claim_state(raw, entry, self.epoch, self.ttl_s, time.time()) == "live":
            return False
        return self.store.replace_if(name, entry.version, self._doc()) and self._hold(unit_id)

    def holds(self, unit_id: str) -> bool:
        """Whether the claim file still names this owner and epoch (false once another worker took it over)."""
        try:
            return self._mine(self.store.read(claim_name(unit_id)))
        except FileNotFoundError:
            return False

    def heartbeat(self) -> None:
        with self._lock:
            held = list(self._held)
        for unit_id in held:
            name = claim_name(unit_id)
            if not self.store.lease_in_object:
                if self.holds(unit_id):
                    self.store.touch(name)
                continue
            # stat before reading: if the claim changes after the stat, the conditional rewrite fails
            entry = self.store.stat(name)
            if entry is not None and self.holds(unit_id):
                self.store.replace_if(name, entry.version, self._doc())

    def release(self, unit_id: str) -> None:
        with self._lock:
            self._held.discard(unit_id)
        if self.holds(unit_id):
            self.store.delete(claim_name(unit_id))

    def release_all(self) -> None:
        with self._lock:
            held = list(self._held)
        for unit_id in held:
            self.release(unit_id)

    def start_heartbeat(self, interval_s: float, alive=None) -> None:
        """Refresh the held claims every interval_s while `alive()` says the worker makes progress: a stalled
        worker (a hung read, a stuck decode) stops heartbeating, so its claims expire and others take them."""
        self.stop_heartbeat()
        stop = self._stop = threading.Event()

        def beat():
            while not stop.wait(interval_s):
                if alive is None or alive():
                    self.heartbeat()

        self._thread = threading.Thread(target=beat, name="po-batch-claims-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


def drop_done_claims(store: Store, epoch: str) -> None:
    """Remove claims on committed units: a worker killed between its commit and its release leaves one behind,
    and no later run visits a done unit to take it over. A live owner does not mind: its release finds nothing."""
    for name in store.names(CLAIMS_DIR):
        if name.endswith(".claim") and is_done(store, name.removesuffix(".claim"), epoch):
            store.delete(f"{CLAIMS_DIR}/{name}")


def read_claims(store: Store, epoch: str, ttl_s: float) -> dict[str, tuple[str, str | None]]:
    """unit -> (claim_state, owner) of every claim; the owner is None where the claim does not parse."""
    now, claims = time.time(), {}
    for entry in store.list(CLAIMS_DIR):
        if not entry.name.endswith(".claim"):
            continue
        unit_id = entry.name.removesuffix(".claim")
        try:
            raw = store.read(claim_name(unit_id))
        except FileNotFoundError:
            continue
        parsed = _parse(raw)
        claims[unit_id] = claim_state(raw, entry, epoch, ttl_s, now), parsed and parsed[0]
    return claims


def claim_states(store: Store, epoch: str, ttl_s: float) -> dict[str, str]:
    """unit -> claim_state of every claim."""
    return {unit_id: state for unit_id, (state, _) in read_claims(store, epoch, ttl_s).items()}


def claims_of(store: Store, pid: int) -> list[str]:
    """The units claimed by process `pid` of this host (a launcher's engine process that died). They are not
    deleted here: a worker of this host sees them dead and takes them over at once, and a delete could race that
    takeover and remove the new owner's claim."""
    prefix = owner_prefix(pid)
    units = []
    for name in store.names(CLAIMS_DIR):
        try:
            parsed = _parse(store.read(f"{CLAIMS_DIR}/{name}"))
        except FileNotFoundError:
            continue
        if name.endswith(".claim") and parsed and parsed[0].startswith(prefix):
            units.append(name.removesuffix(".claim"))
    return sorted(units)
