"""The CPU prep pool: worker processes apply a picklable function (a Prep) to rows, in order and with a bound on
how many rows are in flight, so reading never runs far ahead of the engine."""

import collections
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import wait

from po_batch.stop import SIGNALS, blocked, unblock


@dataclass
class RowError:
    """A row that could not be prepared: `kind: message` lands in the output's error column."""
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


WORKER_DIED = "a prep worker process died (killed, or out of memory)"


def _worker(conn, prep: Callable) -> None:
    # Signals are the parent's to handle: Ctrl-C, scancel and Slurm's USR1 reach the whole process group, and a
    # worker dying mid-task would lose its rows. The parent finishes, then closes the pipe (or kills us). We
    # started with them blocked (stop.blocked): one that came while we imported and unpickled is dropped here.
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    unblock()
    try:
        conn.send(None)  # ready: the parent starts timing the first row now, not while we imported and unpickled
        while True:
            k, row = conn.recv()
            conn.send((k, prep(row)))
    except (EOFError, OSError):  # the parent closed our pipe: done (or it stopped early)
        return


class _Worker:
    """One worker process, its pipe, and the rows sent to it in order: the first is the one being prepared."""

    def __init__(self, ctx, prep):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, prep), daemon=True, name="po-batch-prep")
        resource_tracker.ensure_running()  # a first start of it would unblock INT and TERM in this thread
        with blocked():
            self.proc.start()  # returns once the child has read the pickled prep
        child.close()
        self.rows = collections.deque()  # (k, row)
        self.since = time.monotonic()    # when its first row began (or the process did)
        self.ready = False
        self.killed_for = None           # the row it was killed for, past the timeout
        self.send_lock = threading.Lock()  # the reader and a replacement both write to a new worker's pipe


class PrepPool:
    """Worker processes, each with its own pipe (no lock shared between processes: a killed worker cannot wedge
    the others). A reader thread hands each row to the least busy worker; a receiver thread collects results as
    soon as they are ready, so workers never wait for the caller; the caller takes them in input order.

    The receiver also watches the workers: a row still unprepared after `row_timeout` seconds, or whose worker
    died (SIGKILL, the OOM killer), becomes a RowError `timeout` or `crashed`; the worker is killed and replaced
    by a thread of its own, and the rows queued behind that row go to the replacement. Workers lost
    `losses_limit` times in a row with no row prepared in between are no row's fault (they cannot start, the node
    is out of memory): map() then fails with WORKER_DIED."""

    PER_WORKER = 4  # rows queued on one worker: enough to hide the pipe's latency, few enough to balance load
    START_S = 60    # what a worker's start (imports, unpickling prep) may add to its first row's timeout

    def __init__(self, prep: Callable, workers: int, inflight: int = 512, row_timeout: float | None = None):
        """prep: any picklable callable row -> result, sent once to each worker; workers: 0 runs it in the
        caller's thread, where no timeout can apply; row_timeout: seconds, or None for no limit."""
        self.prep, self.inflight, self.row_timeout = prep, inflight, row_timeout
        self.losses_limit = max(8, 2 * workers)
        self.closing = False
        self.cond = threading.Condition()
        # spawn: the parent holds threads and maybe a CUDA context, neither of which survives fork safely
        self.ctx = mp.get_context("spawn")
        self.workers: list[_Worker | None] = [_Worker(self.ctx, prep) for _ in range(workers)]  # None: restarting
        self.busy = [0] * workers  # len(rows) of each worker, PER_WORKER while it restarts: min() picks fast
        self.version = 0           # of self.workers, for the receiver
        self.restarts: list[threading.Thread] = []
        self.queued = 0  # rows handed to workers and not yet back
        self.progress_at = time.monotonic()
        self.losses = 0
        self.keys, self.results, self.next_k = {}, {}, 0  # of the map() under way
        self.sent, self.read_done, self.failure = 0, False, None
        if workers:
            threading.Thread(target=self._receive, name="po-batch-receiver", daemon=True).start()

    @property
    def last_progress(self) -> float:
        """time.monotonic() of the last result (a row prepared, or one that timed out or crashed), or now while no
        row waits on a worker: how stale it is says whether prep is stalled (a run stops heartbeating its claims
        then). With a row_timeout, a stall lasts at most that long, plus a worker's restart."""
        with self.cond:
            return self.progress_at if self.queued else time.monotonic()

    def map(self, items: Iterable[tuple[object, object]]) -> Iterator[tuple[object, object]]:
        """items: (key, row) pairs; yields (key, result) in the same order. The input iterable is consumed in the
        reader thread, at most `inflight` rows ahead of what the caller has taken; its exceptions reach the caller."""
        if not self.workers:
            for key, row in items:
                self.progress_at, self.queued = time.monotonic(), 1
                result = self.prep(row)
                self.queued = 0
                yield key, result
            return
        with self.cond:
            self.keys, self.results, self.next_k = {}, {}, 0
            self.sent, self.read_done = 0, False
        threading.Thread(target=self._read, args=(items,), name="po-batch-reader", daemon=True).start()
        cond = self.cond
        while True:
            k = self.next_k
            with cond:
                cond.wait_for(lambda: k in self.results or self.failure is not None
                              or (self.read_done and k >= self.sent))
                if k in self.results:
                    result, key = self.results.pop(k), self.keys.pop(k)
                    self.next_k = k + 1
                    cond.notify_all()
                elif self.failure is not None:
                    raise self.failure
                else:
                    break
            yield key, result

    def _read(self, items) -> None:
        cond = self.cond
        try:
            for k, (key, row) in enumerate(items):
                with cond:
                    cond.wait_for(lambda: self.closing or (k - self.next_k < self.inflight
                                                           and min(self.busy) < self.PER_WORKER))
                    if self.closing:
                        return
                    slot = self.busy.index(min(self.busy))
                    w = self.workers[slot]
                    now = time.monotonic()
                    if not w.rows:
                        w.since = now
                    if not self.queued:  # prep was idle until now, not stalled
                        self.progress_at = now
                    w.rows.append((k, row))
                    self.busy[slot] += 1
                    self.keys[k] = key
                    self.queued += 1
                    self.sent = k + 1
                with w.send_lock:
                    try:
                        w.conn.send((k, row))
                    except OSError:  # it died: the row is in its queue, which its replacement gets
                        pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self._fail(e)
        finally:
            with cond:
                self.read_done = True
                cond.notify_all()

    def _receive(self) -> None:
        cond = self.cond
        tick = min(0.5, self.row_timeout / 4) if self.row_timeout else 0.5
        checked, version = time.monotonic(), -1
        try:
            while not self.closing:
                if version != self.version:
                    with cond:
                        version = self.version
                        live = {w.conn: (slot, w) for slot, w in enumerate(self.workers) if w is not None}
                try:
                    ready = wait(list(live), timeout=tick)
                except (OSError, ValueError):  # a pipe was closed under us: the pool is closing
                    continue
                for conn in ready:
                    slot, w = live[conn]
                    try:
                        msg = conn.recv()
                    except Exception:  # noqa: BLE001 - EOF: it died; anything else: its pipe is no use either
                        self._lost(slot, w)
                        continue
                    now = time.monotonic()
                    with cond:
                        w.since = now
                        if msg is None:  # ready
                            w.ready = True
                            continue
                        k, result = msg
                        w.rows.popleft()
                        self.busy[slot] -= 1
                        self.results[k] = result
                        self.queued -= 1
                        self.progress_at, self.losses = now, 0
                        cond.notify_all()
                if self.row_timeout and time.monotonic() - checked >= tick:  # off the per-row path
                    checked = time.monotonic()
                    self._kill_overdue(checked)
        except BaseException as e:  # noqa: BLE001 - the caller would wait forever for results
            self._fail(e)

    def _kill_overdue(self, now: float) -> None:
        with self.cond:
            for w in self.workers:
                if w is None or not w.rows or w.killed_for is not None:
                    continue
                if now - w.since > self.row_timeout + (0 if w.ready else self.START_S):
                    w.killed_for = w.rows[0][0]
                    w.proc.kill()  # its pipe then reads as closed, and _lost does the rest

    def _lost(self, slot: int, w: _Worker) -> None:
        """w's process is gone. Its first row is to blame if w was preparing it (and did not die for a row that
        was done in the meantime); the others go to a replacement."""
        with self.cond:
            if self.closing:
                return
            self.workers[slot] = None
            self.busy[slot] = self.PER_WORKER
            self.version += 1
            rows = list(w.rows)
            if rows and w.ready and w.killed_for in (None, rows[0][0]):
                if w.killed_for is None:
                    error = RowError("crashed", "the prep worker died on this row (killed, or out of memory)")
                else:
                    error = RowError("timeout", f"prep took over {self.row_timeout:g} s (run.row_timeout_s); "
                                                "its worker was killed")
                self.results[rows.pop(0)[0]] = error
                self.queued -= 1
                self.progress_at = time.monotonic()
                self.cond.notify_all()
            self.losses += 1
            if self.losses >= self.losses_limit:
                self._fail(RuntimeError(f"{WORKER_DIED}, {self.losses} times in a row with no row prepared"))
                return
            t = threading.Thread(target=self._restart, args=(slot, w, rows), name="po-batch-restart", daemon=True)
            t.start()
            self.restarts.append(t)

    def _restart(self, slot: int, old: _Worker, rows: list) -> None:
        old.proc.kill()  # dead already, unless what broke was reading its result
        with old.send_lock:  # the reader may be writing to it: that write fails at once now
            old.conn.close()
        old.proc.join()
        with self.cond:
            if self.closing:
                return
        try:
            new = _Worker(self.ctx, self.prep)
        except Exception as e:  # noqa: BLE001 - out of processes, memory, file descriptors
            self._fail(RuntimeError(f"{WORKER_DIED}, and a new one could not start ({e})"))
            return
        with new.send_lock:  # the rows it inherits go first, before the reader can send it more
            with self.cond:
                if not self.closing:
                    new.rows.extend(rows)
                    self.workers[slot] = new
                    self.busy[slot] = len(rows)
                    self.version += 1
                    self.cond.notify_all()
            if self.workers[slot] is not new:  # closing
                new.proc.kill()
                new.proc.join()
                return
            for k, row in rows:
                try:
                    new.conn.send((k, row))
                except OSError:  # it died too: the receiver sees to it
                    break

    def _fail(self, e: BaseException) -> None:
        with self.cond:
            self.failure = self.failure or e
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closing = True  # from now on no restart puts a worker in place
            self.cond.notify_all()
            workers = [w for w in self.workers if w is not None]
        for w in workers:
            if w.rows:  # their results are not wanted any more, and the row may never end
                w.proc.kill()
            w.conn.close()
        deadline = time.monotonic() + 5
        for w in workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
        for t in self.restarts:  # each ends soon: its new worker, if any, was killed above or by itself
            t.join()
