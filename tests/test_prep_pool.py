"""PrepPool with real worker processes: results in input order, and a row that hangs or kills its worker becomes
that row's error while the pool replaces the worker and goes on; workers that keep dying fail the map."""

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from po_batch.prep.pool import WORKER_DIED, PrepPool, RowError


class Poisonable:
    """A picklable row -> result callable whose poisoned rows misbehave for real: ("sleep", s) takes s seconds,
    "exit" ends the worker process (as a segfault in a decoder would), ("pid", file) writes the worker's pid to
    file and then sleeps until it is killed."""

    def __call__(self, row):
        if row == "exit":
            os._exit(1)
        if isinstance(row, tuple) and row[0] == "sleep":
            time.sleep(row[1])
            return "slept"
        if isinstance(row, tuple) and row[0] == "pid":
            Path(row[1]).write_text(str(os.getpid()))
            time.sleep(3600)
        return row * 2


class SlowStart(Poisonable):
    """Takes 3 s to unpickle, in the worker only: a start as slow as a loaded node's."""

    def __getstate__(self):
        return {"slow": True}  # a state, or pickle would never call __setstate__

    def __setstate__(self, state):
        time.sleep(3)


def run(pool: PrepPool, rows: list) -> dict:
    return dict(pool.map(enumerate(rows)))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2] != "Z"


@pytest.fixture
def pool_of():
    pools = []

    def make(*args, prep=None, **kw):
        pools.append(PrepPool(prep or Poisonable(), *args, **kw))
        return pools[-1]

    yield make
    for p in pools:
        p.close()


def test_results_come_in_input_order_from_several_workers(pool_of):
    pool = pool_of(2)
    rows = [("sleep", 0.05) if i % 7 == 0 else i for i in range(300)]
    assert run(pool, rows) == {i: "slept" if i % 7 == 0 else 2 * i for i in range(300)}


def test_a_row_past_the_timeout_is_a_timeout_error_and_its_worker_is_replaced(pool_of):
    pool = pool_of(2, row_timeout=1.5)
    pids = {w.proc.pid for w in pool.workers}
    rows = list(range(10)) + [("sleep", 3600)] + list(range(10, 40))
    t = time.monotonic()
    got = run(pool, rows)
    assert time.monotonic() - t < 30
    assert isinstance(got[10], RowError) and got[10].kind == "timeout" and "run.row_timeout_s" in str(got[10])
    assert {k: v for k, v in got.items() if k != 10} == {k: 2 * r for k, r in enumerate(rows) if k != 10}
    now = {w.proc.pid for w in pool.workers}
    assert len(now) == 2 and len(now - pids) == 1, "the stuck worker was not replaced"
    assert not any(alive(p) for p in pids - now), "the stuck worker is still running"
    # a slow row under the timeout is not one
    assert run(pool, [("sleep", 0.5), 1]) == {0: "slept", 1: 2}


def test_a_worker_s_start_does_not_count_against_its_first_row(pool_of):
    pool = pool_of(2, prep=SlowStart(), row_timeout=1)
    assert run(pool, list(range(10))) == {i: 2 * i for i in range(10)}


def test_a_worker_that_exits_on_a_row_makes_that_row_crashed_and_the_rest_are_prepared(pool_of):
    pool = pool_of(2)
    rows = [("exit" if i in (5, 6, 40) else i) for i in range(80)]
    got = run(pool, rows)
    for k in (5, 6, 40):
        assert isinstance(got[k], RowError) and got[k].kind == "crashed", got[k]
    assert {k: v for k, v in got.items() if k not in (5, 6, 40)} == {k: 2 * k for k in range(80) if k not in (5, 6, 40)}
    assert all(w is not None and alive(w.proc.pid) for w in pool.workers)


def test_a_worker_sigkilled_from_outside_on_a_row_makes_only_that_row_crashed(pool_of, tmp_path):
    pool = pool_of(2)
    pid_file = tmp_path / "pid"
    rows = list(range(20)) + [("pid", str(pid_file))] + list(range(21, 60))
    got = {}
    mapping = threading.Thread(target=lambda: got.update(run(pool, rows)), daemon=True)
    mapping.start()
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and mapping.is_alive()
        time.sleep(0.01)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)  # as the OOM killer would
    mapping.join(60)
    assert not mapping.is_alive()
    assert got[20].kind == "crashed"
    assert {k: v for k, v in got.items() if k != 20} == {k: 2 * k for k in range(60) if k != 20}


def test_workers_that_keep_dying_fail_the_map_with_the_clear_message(pool_of):
    pool = pool_of(2)
    assert pool.losses_limit == 8
    t = time.monotonic()
    with pytest.raises(RuntimeError, match=re.escape(f"{WORKER_DIED}, 8 times in a row with no row prepared")):
        run(pool, [1, 2] + ["exit"] * 20)
    assert time.monotonic() - t < 60


def test_poisoned_rows_between_good_ones_never_add_up_to_a_failure(pool_of):
    pool = pool_of(1)
    rows = ["exit" if i % 2 else i for i in range(24)]  # 12 deaths, more than losses_limit, none in a row
    got = run(pool, rows)
    assert [k for k, v in got.items() if isinstance(v, RowError)] == list(range(1, 24, 2))


def test_last_progress_is_old_only_while_a_row_is_stuck(pool_of):
    pool = pool_of(1, row_timeout=3)
    assert time.monotonic() - pool.last_progress < 0.1  # idle
    results = pool.map(enumerate([1, ("sleep", 3600), 2]))
    assert next(results) == (0, 2)
    time.sleep(2)
    assert time.monotonic() - pool.last_progress > 1.5  # stuck on the sleeping row
    assert next(results)[1].kind == "timeout"
    assert next(results) == (2, 4)
    assert next(results, None) is None
    assert time.monotonic() - pool.last_progress < 0.1  # idle again


def test_in_process_pool_has_no_workers_and_reports_progress(pool_of):
    pool = pool_of(0, row_timeout=1)
    assert run(pool, [1, ("sleep", 0.2), 3]) == {0: 2, 1: "slept", 2: 6}
    assert time.monotonic() - pool.last_progress < 0.1


def test_close_ends_a_stuck_worker(pool_of):
    pool = pool_of(1)  # no timeout: close() alone must end it
    results = pool.map(enumerate([("sleep", 3600)]))
    threading.Thread(target=lambda: next(results, None), daemon=True).start()
    time.sleep(1)
    pid = pool.workers[0].proc.pid
    t = time.monotonic()
    pool.close()
    assert time.monotonic() - t < 2 and not alive(pid)


def test_a_signal_to_the_process_group_while_a_worker_starts_does_not_kill_it(pool_of):
    """Slurm signals every process of a step, Ctrl-C the whole process group: a worker that is still importing
    and unpickling (SlowStart: 3 s) must not die of SIGUSR1's or SIGTERM's default action (the pool replaced it,
    and after `losses_limit` such deaths failed the run)."""
    pool = pool_of(2, prep=SlowStart(), row_timeout=30)
    pids = [w.proc.pid for w in pool.workers]
    time.sleep(0.5)
    for pid in pids:
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            os.kill(pid, sig)
    assert run(pool, list(range(8))) == {k: 2 * k for k in range(8)}
    assert [w.proc.pid for w in pool.workers] == pids and all(alive(pid) for pid in pids)  # none was replaced
