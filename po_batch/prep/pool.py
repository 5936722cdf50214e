"""The CPU prep pool: worker processes turn rows into Samples, or into row errors, in order and with a bound on
how many rows are in flight, so reading never runs far ahead of the engine."""

import collections
import multiprocessing as mp
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from po_batch.prep.image import ImageError, ImageSpec, prepare, read_path
from po_batch.prep.patches import to_patches
from po_batch.prep.prompt import PromptTemplate
from po_batch.sample import Sample


@dataclass
class RowError:
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass
class Prep:
    """What a worker needs, sent to it once."""
    template: PromptTemplate
    spec: ImageSpec | None       # None for text-only models

    def __call__(self, row: tuple[object, dict]) -> Sample | RowError:
        """row: (image bytes, a path or None; the prompt's fields)."""
        image, fields = row
        try:
            if self.spec is None:
                return Sample(*self.template.encode(fields))
            if image is None:
                raise ImageError("the row has no image", "missing")
            data = read_path(image) if isinstance(image, str) else image
            pixels, grid = prepare(data, self.spec)
            ids, pos = self.template.encode(fields, grid)
            return Sample(ids, pos, to_patches(pixels, self.spec.patch_size, self.spec.merge_size), grid)
        except ImageError as e:
            return RowError(e.kind, str(e))
        except Exception as e:  # a bad row is data: whatever broke, it stays with the row
            return RowError("prep", f"{type(e).__name__}: {e}")


def _worker(conn, prep: Prep) -> None:
    # Signals are the parent's to handle: Ctrl-C, scancel and Slurm's USR1 reach the whole process group, and a
    # worker dying mid-task would lose its rows. The parent finishes, then closes the pipe (or kills us).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            conn.send(prep(conn.recv()))
        except (EOFError, OSError):  # the parent closed our pipe: done (or it stopped early)
            return


class PrepPool:
    """Worker processes, each with its own pipe: row k goes to worker k % n and its result is read back from there,
    so results come in input order and no lock is shared (a killed worker cannot wedge the others)."""

    def __init__(self, prep: Prep, workers: int, inflight: int = 512):
        self.prep, self.inflight = prep, inflight
        self.room = threading.Semaphore(inflight)
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

    def map(self, items: Iterable[tuple[object, tuple]]) -> Iterator[tuple[object, Sample | RowError]]:
        """items: (key, row) pairs; yields (key, result) in the same order. The input iterable is consumed in a
        feeder thread, at most `inflight` rows ahead of what the caller has taken; its exceptions reach the caller."""
        if not self.conns:
            for key, row in items:
                yield key, self.prep(row)
            return
        keys, sent, done, failure = collections.deque(), threading.Semaphore(0), threading.Event(), []

        def feed():
            try:
                for k, (key, row) in enumerate(items):
                    self.room.acquire()
                    if self.closing:
                        return
                    keys.append(key)
                    self.conns[k % len(self.conns)].send(row)
                    sent.release()
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                failure.append(e)
            finally:
                done.set()
                sent.release()

        feeder = threading.Thread(target=feed, name="po-batch-reader", daemon=True)
        feeder.start()
        k = 0
        while True:
            sent.acquire()
            if not keys:
                if done.is_set():
                    break
                continue
            try:
                result = self.conns[k % len(self.conns)].recv()
            except EOFError:
                raise RuntimeError("a prep worker process died (killed, or out of memory); rerun to resume") from None
            k += 1
            self.room.release()
            yield keys.popleft(), result
        feeder.join()
        if failure:
            raise failure[0]

    def close(self) -> None:
        self.closing = True
        for _ in range(self.inflight):  # unblock a feeder waiting for room
            self.room.release()
        for conn in self.conns:
            conn.close()
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
