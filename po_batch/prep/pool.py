"""The CPU prep pool: worker processes apply a picklable function (a Prep) to rows, in order and with a bound on
how many rows are in flight, so reading never runs far ahead of the engine."""

import multiprocessing as mp
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import wait
from dataclasses import dataclass


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
    # worker dying mid-task would lose its rows. The parent finishes, then closes the pipe (or kills us).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            k, row = conn.recv()
            conn.send((k, prep(row)))
        except (EOFError, OSError):  # the parent closed our pipe: done (or it stopped early)
            return


class PrepPool:
    """Worker processes, each with its own pipe (no lock shared between processes: a killed worker cannot wedge
    the others). A reader thread hands each row to the least busy worker; a receiver thread collects results as
    soon as they are ready, so workers never wait for the caller; the caller takes them in input order."""

    PER_WORKER = 4  # rows queued on one worker: enough to hide the pipe's latency, few enough to balance load

    def __init__(self, prep: Callable, workers: int, inflight: int = 512):
        self.prep, self.inflight = prep, inflight
        self.closing = False
        # spawn: the parent holds threads and maybe a CUDA context, neither of which survives fork safely
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, prep), daemon=True, name="po-batch-prep")
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self.busy = [0] * workers
        self.cond = threading.Condition()

    def map(self, items: Iterable[tuple[object, tuple]]) -> Iterator[tuple[object, object]]:
        """items: (key, row) pairs; yields (key, result) in the same order. The input iterable is consumed in the
        reader thread, at most `inflight` rows ahead of what the caller has taken; its exceptions reach the caller."""
        if not self.conns:
            for key, row in items:
                yield key, self.prep(row)
            return
        keys, results, state = {}, {}, {"sent": 0, "read_done": False, "failure": None}
        cond = self.cond

        def read():
            try:
                for k, (key, row) in enumerate(items):
                    with cond:
                        cond.wait_for(lambda: self.closing or (k - next_k[0] < self.inflight
                                                               and min(self.busy) < self.PER_WORKER))
                        if self.closing:
                            return
                        w = self.busy.index(min(self.busy))
                        self.busy[w] += 1
                        keys[k] = key
                    try:
                        self.conns[w].send((k, row))
                    except OSError:
                        if self.closing:
                            return
                        raise RuntimeError(WORKER_DIED) from None
                    with cond:
                        state["sent"] = k + 1
                        cond.notify_all()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                state["failure"] = e
            finally:
                with cond:
                    state["read_done"] = True
                    cond.notify_all()

        def receive():
            live = {c: w for w, c in enumerate(self.conns)}
            while live and not self.closing:
                try:
                    ready = wait(list(live), timeout=0.5)
                except (OSError, ValueError):  # our pipes were closed under us: the pool is closing
                    return
                for conn in ready:
                    try:
                        k, result = conn.recv()
                    except (EOFError, OSError):
                        del live[conn]
                        if not self.closing:
                            with cond:
                                state["failure"] = state["failure"] or RuntimeError(WORKER_DIED)
                                cond.notify_all()
                        continue
                    with cond:
                        results[k] = result
                        self.busy[live[conn]] -= 1
                        cond.notify_all()

        next_k = [0]
        threads = [threading.Thread(target=read, name="po-batch-reader", daemon=True),
                   threading.Thread(target=receive, name="po-batch-receiver", daemon=True)]
        for t in threads:
            t.start()
        while True:
            k = next_k[0]
            with cond:
                cond.wait_for(lambda: k in results or state["failure"] is not None
                              or (state["read_done"] and k >= state["sent"]))
                if k in results:
                    result, key = results.pop(k), keys.pop(k)
                    next_k[0] = k + 1
                    cond.notify_all()
                elif state["failure"] is not None:
                    raise state["failure"]
                else:
                    break
            yield key, result

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        for conn in self.conns:
            conn.close()
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
