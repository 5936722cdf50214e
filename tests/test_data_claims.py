"""Claims: atomic create between real processes, takeover of stale claims, heartbeats."""

import multiprocessing as mp
import os
import time

from po_batch.data.claims import Claims, claimed_units, default_owner

UNITS = [f"u{i:03d}" for i in range(200)]


def _claim_all(out, owner, go, results):
    claims = Claims(out, owner)
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
    assert claimed_units(str(tmp_path), 300) == set(UNITS)


def _make_stale(out, unit):
    path = os.path.join(out, "_po_batch", "claims", f"{unit}.claim")
    old = time.time() - 1000
    os.utime(path, (old, old))


def _take_over(out, owner, go, results):
    claims = Claims(out, owner, ttl_s=60)
    go.wait()
    # holds() is checked by the test once every racer is done: a losing racer may move the winner's claim
    # aside for an instant (and put it back) while it checks what it renamed
    results.put((owner, claims.try_claim("u")))


def test_stale_claim_is_taken_over_by_exactly_one_racer(tmp_path):
    out = str(tmp_path)
    for _ in range(5):
        dead = Claims(out, "dead-worker")
        assert dead.try_claim("u")
        _make_stale(out, "u")
        got = _run_racers(_take_over, out, 4)
        assert sum(got.values()) == 1, got
        winner = next(o for o, won in got.items() if won)
        assert open(os.path.join(out, "_po_batch", "claims", "u.claim")).read() == winner
        assert not dead.holds("u")
        assert os.listdir(os.path.join(out, "_po_batch", "claims")) == ["u.claim"]  # no tombstones left
        Claims(out, winner).release("u")


def test_fresh_claim_is_not_taken_over_and_release_frees_it(tmp_path):
    a, b = Claims(str(tmp_path), "a", ttl_s=60), Claims(str(tmp_path), "b", ttl_s=60)
    assert a.try_claim("u") and not b.try_claim("u")
    b.release("u")  # not b's: stays
    assert not b.try_claim("u")
    a.release("u")
    assert b.try_claim("u") and claimed_units(str(tmp_path), 60) == {"u"}
    b.release_all()
    assert claimed_units(str(tmp_path), 60) == set()


def test_heartbeat_keeps_a_claim_alive(tmp_path):
    out = str(tmp_path)
    a, b = Claims(out, default_owner(), ttl_s=60), Claims(out, default_owner(), ttl_s=60)
    assert a.try_claim("u")
    _make_stale(out, "u")
    assert claimed_units(out, 60) == set()
    a.heartbeat()
    assert claimed_units(out, 60) == {"u"} and not b.try_claim("u")

    _make_stale(out, "u")
    a.start_heartbeat(0.02)
    time.sleep(0.2)
    a.stop_heartbeat()
    assert not b.try_claim("u") and a.holds("u")
