"""Claims: atomic create between real processes, takeover of stale claims (expired, dead owner, unreadable, of a
replaced plan), and never of a live owner in another PID namespace; heartbeats."""

import errno
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import tmpfs

from po_batch.data.claims import UNREADABLE_GRACE_S, Claims, claim_states, default_owner
from po_batch.data.store import LocalStore

UNITS = [f"u{i:03d}" for i in range(200)]
EPOCH = "e" * 32


def live(out, ttl=300.0, epoch=EPOCH) -> set[str]:
    return {u for u, s in claim_states(LocalStore(out), epoch, ttl).items() if s == "live"}


def claim_path(out, unit="u"):
    return os.path.join(out, "_po_batch", "claims", f"{unit}.claim")


def _claim_all(out, owner, go, results):
    claims = Claims(LocalStore(out), owner, EPOCH)
    go.wait()
    results.put((owner, [u for u in UNITS if claims.try_claim(u)]))


def _run_racers(target, out, n):
    ctx = mp.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(out, f"w{i}", go, results)) for i in range(n)]
    for p in procs:
        p.start()
    go.set()
    got = dict(results.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return got


def test_two_owners_never_both_claim_a_unit(tmp_path):
    got = _run_racers(_claim_all, str(tmp_path), 2)
    a, b = set(got["w0"]), set(got["w1"])
    assert not a & b and a | b == set(UNITS)
    assert live(str(tmp_path)) == set(UNITS)


def _age(out, unit="u", seconds=1000.0):
    old = time.time() - seconds
    os.utime(claim_path(out, unit), (old, old))


def _take_over(out, owner, go, results):
    claims = Claims(LocalStore(out), owner, EPOCH, ttl_s=60)
    go.wait()
    # holds() is checked by the test once every racer is done: a losing racer may move the winner's claim
    # aside for an instant (and put it back) while it checks what it renamed
    results.put((owner, claims.try_claim("u")))


def test_stale_claim_is_taken_over_by_exactly_one_racer(tmp_path):
    out = str(tmp_path)
    for _ in range(5):
        dead = Claims(LocalStore(out), "dead-worker", EPOCH)
        assert dead.try_claim("u")
        _age(out)
        got = _run_racers(_take_over, out, 4)
        assert sum(got.values()) == 1, got
        winner = next(o for o, won in got.items() if won)
        assert json.load(open(claim_path(out))) == {"owner": winner, "epoch": EPOCH}
        assert not dead.holds("u")
        assert os.listdir(os.path.join(out, "_po_batch", "claims")) == ["u.claim"]  # no tombstones left
        Claims(LocalStore(out), winner, EPOCH).release("u")


def test_fresh_claim_is_not_taken_over_and_release_frees_it(tmp_path):
    store = LocalStore(tmp_path)
    a, b = Claims(store, "a", EPOCH, ttl_s=60), Claims(store, "b", EPOCH, ttl_s=60)
    assert a.try_claim("u") and not b.try_claim("u")
    b.release("u")  # not b's: stays
    assert not b.try_claim("u")
    a.release("u")
    assert b.try_claim("u") and live(str(tmp_path), 60) == {"u"}
    b.release_all()
    assert live(str(tmp_path), 60) == set()


def test_heartbeat_keeps_a_claim_alive(tmp_path):
    out, store = str(tmp_path), LocalStore(tmp_path)
    a, b = Claims(store, default_owner(), EPOCH, ttl_s=60), Claims(store, default_owner(), EPOCH, ttl_s=60)
    assert a.try_claim("u")
    _age(out)
    assert live(out, 60) == set()
    a.heartbeat()
    assert live(out, 60) == {"u"} and not b.try_claim("u")

    _age(out)
    a.start_heartbeat(0.02)
    time.sleep(0.2)
    a.stop_heartbeat()
    assert not b.try_claim("u") and a.holds("u")


def test_claim_of_a_replaced_plan_is_taken_over_at_once(tmp_path):
    store = LocalStore(tmp_path)
    old = Claims(store, default_owner(), "old-epoch" + "0" * 23, ttl_s=300)
    assert old.try_claim("u")
    new = Claims(store, default_owner(), EPOCH, ttl_s=300)
    assert claim_states(store, EPOCH, 300) == {"u": "expired"}
    assert new.try_claim("u") and new.holds("u") and not old.holds("u")


def test_unreadable_claim_is_stale_after_a_short_grace_not_the_ttl(tmp_path):
    """What a full disk leaves at claim creation: an empty file, or half of one."""
    out, store = str(tmp_path), LocalStore(tmp_path)
    other = Claims(store, default_owner(), EPOCH, ttl_s=3600)
    for content in (b"", b'{"owner":"host:1'):
        os.makedirs(os.path.dirname(claim_path(out)), exist_ok=True)
        with open(claim_path(out), "wb") as f:
            f.write(content)
        assert not other.try_claim("u")  # it may be a claim being written this instant
        assert claim_states(store, EPOCH, 3600) == {"u": "live"}
        _age(out, seconds=UNREADABLE_GRACE_S + 1)
        assert claim_states(store, EPOCH, 3600) == {"u": "expired"}
        assert other.try_claim("u") and other.holds("u")
        other.release("u")
    short = Claims(store, default_owner(), EPOCH, ttl_s=5)  # a ttl shorter than the grace wins
    open(claim_path(out), "wb").close()
    _age(out, seconds=6)
    assert short.try_claim("u")


@pytest.fixture
def full_tmpfs(tmp_path):
    """A real 64 KiB tmpfs, filled up; root only."""
    with tmpfs(tmp_path / "mnt", "64k") as mnt:
        (mnt / "_po_batch" / "claims").mkdir(parents=True)
        with open(mnt / "filler", "wb", buffering=0) as f:
            with pytest.raises(OSError) as e:
                while True:
                    f.write(b"x" * 4096)
            assert e.value.errno == errno.ENOSPC
        yield mnt


def test_claim_on_a_full_disk_fails_without_leaving_an_empty_claim(full_tmpfs):
    claims = Claims(LocalStore(full_tmpfs), default_owner(), EPOCH)
    with pytest.raises(OSError) as e:
        claims.try_claim("u")
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(full_tmpfs / "_po_batch" / "claims") == []
    assert not claims.holds("u")


def test_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    code = ("import sys; from po_batch.data.claims import Claims, default_owner; "
            "from po_batch.data.store import LocalStore; "
            f"assert Claims(LocalStore(sys.argv[1]), default_owner(), {EPOCH!r}).try_claim('u')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    store = LocalStore(tmp_path)
    assert claim_states(store, EPOCH, 3600) == {"u": "dead"}
    assert Claims(store, default_owner(), EPOCH, ttl_s=3600).try_claim("u")


def _free_pids() -> list[int]:
    """Pids no process of this namespace has: a process in a new PID namespace can get one of them."""
    return [p for p in range(2, 500) if not os.path.exists(f"/proc/{p}")]


def test_owner_of_another_pid_namespace_or_boot_is_judged_by_the_ttl_alone(tmp_path):
    host, _, boot, ns, _ = default_owner().split(":")
    pid = _free_pids()[0]  # no such process here; it may well live in another namespace
    store = LocalStore(tmp_path)
    for owner in (f"{host}:{pid}:{boot}:{int(ns) + 1}:abcd", f"{host}:{pid}:another-boot:{ns}:abcd",
                  f"{host}:{pid}:xyz"):  # the owner format of older po-batch
        store.put("_po_batch/claims/u.claim", json.dumps({"owner": owner, "epoch": EPOCH}).encode())
        claims = Claims(store, default_owner(), EPOCH, ttl_s=60)
        assert claim_states(store, EPOCH, 60) == {"u": "live"} and not claims.try_claim("u")
        _age(str(tmp_path), seconds=61)
        assert claims.try_claim("u")
        claims.release("u")
    store.put("_po_batch/claims/u.claim", json.dumps({"owner": f"{host}:{pid}:{boot}:{ns}:abcd",
                                                      "epoch": EPOCH}).encode())
    assert claim_states(store, EPOCH, 60) == {"u": "dead"}  # the same namespace: provably dead


NAMESPACED_CLAIM = """
import os, sys, time
from po_batch.data.claims import Claims, default_owner
from po_batch.data.store import LocalStore
out, free, epoch = sys.argv[1], {int(p) for p in sys.argv[2].split(",")}, sys.argv[3]
while True:  # we are pid 1 of a new namespace: fork until a child gets a pid that is free outside it
    pid = os.fork()
    if pid == 0:
        if os.getpid() in free:
            assert Claims(LocalStore(out), default_owner(), epoch).try_claim("u")
            print(os.getpid(), flush=True)
            time.sleep(120)
        os._exit(0)
    os.waitpid(pid, 0)
"""


def test_live_claim_in_another_pid_namespace_with_this_hostname_is_not_taken_over(tmp_path):
    """Containers with host networking share the hostname; their pids mean nothing here."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a new PID namespace needs root and unshare")
    free = _free_pids()[:50]
    p = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", NAMESPACED_CLAIM,
                          str(tmp_path), ",".join(map(str, free)), EPOCH],
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        inner = int(p.stdout.readline())
        assert inner in free
        with pytest.raises(ProcessLookupError):
            os.kill(inner, 0)  # what the claim says is no process of this namespace
        store = LocalStore(tmp_path)
        host, pid, boot, ns, _ = json.load(open(claim_path(str(tmp_path))))["owner"].split(":")
        assert (host, pid, boot) == (socket.gethostname(), str(inner), default_owner().split(":")[2])
        assert ns != default_owner().split(":")[3]
        assert claim_states(store, EPOCH, 300) == {"u": "live"}
        assert not Claims(store, default_owner(), EPOCH, ttl_s=300).try_claim("u")
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
