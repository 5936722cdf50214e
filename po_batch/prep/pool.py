"""The CPU prep pool: worker processes turn rows into Samples, or into row errors, in order and with a bound on
how many rows are in flight, so reading never runs far ahead of the engine."""

import collections
import multiprocessing as mp
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


_PREP: Prep | None = None


def _init(prep: Prep) -> None:
    global _PREP
    _PREP = prep


def _run(row):
    return _PREP(row)


class PrepPool:
    def __init__(self, prep: Prep, workers: int, inflight: int = 512):
        self.prep, self.inflight = prep, inflight
        self.room = threading.Semaphore(inflight)
        self.closing = False
        # spawn: the parent holds threads and maybe a CUDA context, neither of which survives fork safely
        self.pool = mp.get_context("spawn").Pool(workers, _init, (prep,)) if workers > 0 else None

    def map(self, items: Iterable[tuple[object, tuple]]) -> Iterator[tuple[object, Sample | RowError]]:
        """items: (key, row) pairs; yields (key, result) in the same order. The input iterable is consumed
        at most `inflight` rows ahead of what the caller has taken."""
        if self.pool is None:
            for key, row in items:
                yield key, self.prep(row)
            return
        keys = collections.deque()

        def feed():  # runs in the pool's task-handler thread
            for key, row in items:
                self.room.acquire()
                if self.closing:
                    return
                keys.append(key)
                yield row

        for result in self.pool.imap(_run, feed(), chunksize=4):
            self.room.release()
            yield keys.popleft(), result

    def close(self) -> None:
        if self.pool is not None:
            self.closing = True
            for _ in range(self.inflight):  # unblock a feeder waiting for room, so the pool can stop
                self.room.release()
            self.pool.terminate()
            self.pool.join()
