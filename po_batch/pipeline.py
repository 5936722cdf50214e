"""Wires the stages of `po-batch run`: plan -> claim -> read -> prep pool -> engine -> sink, with progress and signals.

The main thread scores; the prep pool's feeder thread reads and claims units just ahead of it; a writer thread
commits finished units. SIGTERM/SIGINT/SIGUSR1 stop claiming, let claimed units finish and commit, and exit 3;
a second signal exits at once. A unit that cannot be read fails alone (exit 1 at the end); a commit that fails
(a full disk) stops the run at once (exit 1)."""

import collections
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from po_batch.config import Config, resolved_device, resolved_dtype, workers_count
from po_batch.data.claims import Claims, default_owner, drop_done_claims
from po_batch.data.plan import Plan, Unit, load_or_create_plan
from po_batch.data.readers import open_reader
from po_batch.data.readers.base import ReadError, UnitReadError
from po_batch.data.readers.parquet import check_unique_ids
from po_batch.data.sink import LostUnit, Sink, clean_orphans
from po_batch.data.store import Store, open_store
from po_batch.prep.pool import PrepPool, RowError
from po_batch.progress import Progress, plural
from po_batch.spec import Spec, open_spec

# 4: this worker's slice is not all done, but nothing is left for it: other workers hold the rest (live claims,
# or claims that have not expired yet); a later run takes over whatever they leave.
EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_OTHERS = 0, 1, 2, 3, 4
# Batches queued on the device before the scoring thread waits for the oldest: two, so that a moment of
# slow prep (or a unit boundary) never leaves the device idle.
QUEUE_DEPTH = 2


@dataclass
class UnitState:
    unit: Unit
    started_at: float
    readout_shape: tuple[int, int]  # per row: rows read, readout width
    pieces: list[pa.RecordBatch] = field(default_factory=list)
    readout: np.ndarray | None = None
    errors: list[str | None] = field(default_factory=list)
    kinds: collections.Counter = field(default_factory=collections.Counter)
    left: int = 0
    failed: str | None = None  # why the unit could not be read: its rows in flight are dropped, nothing commits
    read_errors: dict[int, ReadError] = field(default_factory=dict)  # rows the reader found bad: they win at commit
    notes: dict = field(default_factory=dict)  # the reader's, for the unit's marker (a truncated shard)

    def __post_init__(self):
        self.readout = np.full((self.unit.rows, *self.readout_shape), np.nan, dtype=np.float32)
        self.errors = [None] * self.unit.rows
        self.left = self.unit.rows


@dataclass
class RunStats:
    rows: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    units: int = 0
    failed_units: int = 0
    # where the scoring thread spent its time: waiting for prepared rows, queuing device work, waiting for results
    wait_prep_s: float = 0.0
    launch_s: float = 0.0
    wait_device_s: float = 0.0


class Runner:
    def __init__(self, spec: Spec, engine, store: Store, plan: Plan, shard: tuple[int, int] | None):
        self.cfg, self.spec, self.engine, self.plan, self.shard = spec.cfg, spec, engine, plan, shard
        self.reader = open_reader(self.cfg.input)
        self.owner = default_owner()
        self.claims = None if shard else Claims(store, self.owner, plan.epoch, self.cfg.run.claim_ttl_s)
        self.sink = Sink(store, plan, self.claims)
        self.replaced = False  # the plan was replaced under this run: nothing it scores can be committed
        self.stopping = False
        self.stats = RunStats()
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="po-batch-writer")
        self.commits = []
        self.inflight = collections.deque()  # (engine handle, its rows) of the batches on the device
        self.left = 0  # units of this worker's slice not yet done when it finished
        self.progress_at = time.monotonic()  # last row prepared or scored: the claims' heartbeat stops without

    # --- reading (runs in the prep pool's reader thread) ---------------------------------------

    def candidates(self) -> list[Unit]:
        i, n = self.shard or (0, 1)
        done = self.sink.done()
        return [u for k, u in enumerate(self.plan.units) if k % n == i and u.id not in done]

    def rows(self):
        """(key, (image, fields)) for every row of every unit this worker claims, claiming lazily."""
        id_column = self.reader.columns.id
        for unit in self.candidates():
            if self.stopping:
                return
            if self.claims and not self.claims.try_claim(unit.id):
                continue
            if self.sink.is_done(unit.id):  # committed by another worker since we listed
                self.claims and self.claims.release(unit.id)
                continue
            st = UnitState(unit, time.time(), (self.spec.tasks.reads, self.spec.tasks.width))
            ids = set()  # the rows read so far: a read error after the last one fails nothing
            try:
                for batch in self.reader.read(unit, self.plan.files[unit.file]):
                    st.pieces.append(batch.table)
                    st.read_errors |= batch.errors
                    st.notes |= batch.notes
                    fields = {c: batch.table.column(c).to_pylist() for c in batch.table.column_names}
                    check_unique_ids(fields[id_column], unit, id_column, ids)
                    base = len(ids) - batch.table.num_rows
                    for j, image in enumerate(batch.images):
                        yield (st, base + j), (image, {c: v[j] for c, v in fields.items()})
            except UnitReadError as e:
                if len(ids) < unit.rows:
                    self.fail_unit(st, str(e))

    def fail_unit(self, st: UnitState, reason: str) -> None:
        """The unit's rows cannot all be read: record why (status shows it, a later run retries the unit), give
        the claim back and go on with the other units; the rows already in flight are scored and dropped."""
        st.failed = reason
        self.sink.mark_failed(st.unit.id, reason, self.owner)
        if self.claims:
            self.claims.release(st.unit.id)
        self.stats.failed_units += 1
        print(f"po-batch: {reason}; the other units go on, a later run retries this one", file=sys.stderr,
              flush=True)

    # --- scoring (main thread) -------------------------------------------------------------------

    def run(self, progress: Progress) -> int:
        pool = PrepPool(self.spec.prep, self.spec.workers, inflight=max(256, 4 * self.cfg.run.batch_tokens // 64),
                        row_timeout=self.cfg.run.row_timeout_s)
        pending, tokens = [], 0
        if self.claims:
            stall_s = self.cfg.run.claim_ttl_s / 2
            self.claims.start_heartbeat(max(1.0, self.cfg.run.claim_ttl_s / 10),
                                        alive=lambda: time.monotonic() - self.progress_at < stall_s)
        try:
            results = pool.map(self.spec.tasks.blocks(self.rows()))
            while True:
                t = time.perf_counter()
                item = next(results, None)
                self.stats.wait_prep_s += time.perf_counter() - t
                self.progress_at = time.monotonic()
                self.check_commits()
                if item is None:
                    break
                (st, i, n), result = item  # rows i..i+n-1 of the unit: one, except where a prompt holds several
                if isinstance(result, RowError):
                    st.errors[i:i + n] = [str(result)] * n
                    st.kinds[result.kind] += n
                    self.finish_rows([(st, j) for j in range(i, i + n)], progress)
                    continue
                # Score before the budget would be exceeded (past it, the engine would split off a batch of
                # one), and at each unit's end: a batch of one unit's rows makes the unit's scores independent
                # of its neighbours, so a resumed or shared run reproduces an uninterrupted one bit for bit.
                if pending and (pending[-1][0] is not st or tokens + result.tokens > self.cfg.run.batch_tokens):
                    self.score(pending, progress)
                    pending, tokens = [], 0
                pending.append((st, i, n, result))
                tokens += result.tokens
            self.score(pending, progress)
            self.settle(progress, keep=0)
            self.check_commits(wait=True)
        finally:
            pool.close()
            self.writer.shutdown(wait=True)
            if self.claims:
                self.claims.stop_heartbeat()
                self.claims.release_all()
        self.left = len(self.candidates())
        if self.replaced or self.stats.failed_units:
            return EXIT_FAILED
        if self.left:
            return EXIT_STOPPED if self.stopping else EXIT_OTHERS
        return EXIT_DONE

    def check_commits(self, wait: bool = False) -> None:
        """Re-raise the first commit that failed (a full disk, a lost mount), at once rather than at the end."""
        keep = []
        for f in self.commits:
            if wait or f.done():
                f.result()
            else:
                keep.append(f)
        self.commits = keep

    def score(self, pending, progress: Progress) -> None:
        """Queue `pending` on the device, then collect the oldest batches beyond QUEUE_DEPTH: the device always
        has work queued while the host reads results and prepares more."""
        if pending:
            t = time.perf_counter()
            self.inflight.append((self.engine.launch([s for _, _, _, s in pending]), pending))
            self.stats.launch_s += time.perf_counter() - t
        self.settle(progress, keep=QUEUE_DEPTH)

    def settle(self, progress: Progress, keep: int) -> None:
        while len(self.inflight) > keep:
            handle, rows = self.inflight.popleft()
            t = time.perf_counter()
            readouts = handle.result()  # per input row, in order
            self.stats.wait_device_s += time.perf_counter() - t
            self.progress_at = time.monotonic()
            at = 0
            for st, i, n, _ in rows:
                st.readout[i:i + n] = readouts[at:at + n]
                at += n
            self.finish_rows([(st, j) for st, i, n, _ in rows for j in range(i, i + n)], progress)

    def finish_rows(self, done: list, progress: Progress) -> None:
        errors = 0
        for st, i in done:
            st.left -= 1
            errors += st.errors[i] is not None
            if st.left == 0 and st.failed is None:
                self.commits.append(self.writer.submit(self.commit, st))
        self.stats.rows += len(done)
        progress.advance(len(done), errors)

    def commit(self, st: UnitState) -> None:
        for i, e in st.read_errors.items():
            if st.errors[i] is not None:
                st.kinds[st.errors[i].split(":", 1)[0]] -= 1
            st.errors[i] = str(e)
            st.kinds[e.kind] += 1
        st.kinds = +st.kinds
        table = pa.Table.from_batches(st.pieces) if st.pieces else None
        failed = np.array([e is not None for e in st.errors])
        for name, values in self.spec.tasks.columns(st.readout, failed).items():
            table = table.append_column(name, values)
        table = table.append_column("error", pa.array(st.errors, pa.string()))
        try:
            self.sink.commit(st.unit.id, table, {
                "rows": st.unit.rows, "errors": int(failed.sum()), "error_kinds": dict(st.kinds),
                "started_at": st.started_at, "finished_at": time.time(), "owner": self.owner,
                **({"notes": st.notes} if st.notes else {})})
        except LostUnit as e:
            print(f"po-batch: {e}", file=sys.stderr, flush=True)
            if e.reason == "epoch":
                self.replaced = self.stopping = True
        else:
            self.stats.units += 1
            self.stats.errors.update(st.kinds)
        if self.claims:
            self.claims.release(st.unit.id)


def run(cfg: Config, restart: bool = False, shard: tuple[int, int] | None = None, stats: RunStats | None = None,
        config_path: str = "a config built in code") -> int:
    """`po-batch run`: plan or resume, score every unclaimed unit, commit each; returns the exit code.
    `stats`, when given, is filled in as the run goes (benchmarks read it); `config_path` names the run in its log.
    Signals are handled from the start: one during planning or the model's load stops the run before it claims."""
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    previous = {s: signal.getsignal(s) for s in signals}
    state = {"runner": None, "progress": None, "stop": None}

    def on_signal(signum, _frame):
        if state["stop"] is not None:
            os._exit(128 + signum)  # a second signal aborts at once; our claims expire (or are seen dead) later
        state["stop"] = signal.Signals(signum).name
        if state["runner"] is not None:
            state["runner"].stopping = True
        if state["progress"] is not None:
            state["progress"].note(f"{state['stop']}: finishing claimed units, then stopping")

    for s in signals:
        signal.signal(s, on_signal)
    try:
        return _run(cfg, restart, shard, stats, config_path, state)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _run(cfg: Config, restart, shard, stats, config_path: str, state: dict) -> int:
    import torch

    device = resolved_device(cfg, torch.cuda.is_available())
    dtype = resolved_dtype(cfg, device)
    spec = open_spec(cfg, device, dtype, workers_count(cfg, len(os.sched_getaffinity(0))))
    store = open_store(cfg.output.path)
    reader = open_reader(cfg.input)
    plan = load_or_create_plan(store, cfg.input.paths, cfg.run.rows_per_unit, spec.fingerprint(), restart,
                               reader.columns, reader)
    clean_orphans(store)
    drop_done_claims(store, plan.epoch)
    runner = state["runner"] = Runner(spec, None, store, plan, shard)
    runner.stopping = state["stop"] is not None
    if stats is not None:
        runner.stats = stats
    for path, why in plan.unreadable.items():
        print(f"po-batch: input {path} is left out: {why}", file=sys.stderr)
    todo = runner.candidates()
    if not todo:
        print(f"nothing to do: every unit of {cfg.output.path} is done ({plural(len(plan.units), 'unit')})")
        return EXIT_FAILED if plan.unreadable else EXIT_DONE
    progress = state["progress"] = Progress(len(todo), sum(u.rows for u in todo), cfg.run.log_every_s)
    progress.announce(config_path, cfg.output.path, f"{device} ({dtype})", spec.workers)
    runner.engine = spec.load_engine()
    if state["stop"] is not None:
        progress.note(f"{state['stop']} before the first unit: stopping")
        return EXIT_STOPPED
    progress.begin()
    started = time.time()
    try:
        code = runner.run(progress)
    except Exception:  # what was committed stays; say how far the run got before the error is reported
        progress.close()
        progress.summary(runner.stats, time.time() - started, cfg.output.path, EXIT_FAILED)
        raise
    progress.close()
    progress.summary(runner.stats, time.time() - started, cfg.output.path, code)
    if code == EXIT_OTHERS:
        progress.note(f"{plural(runner.left, 'unit')} left to the other workers that claimed them (exit 4); a later "
                      f"run takes over any they do not commit")
    return EXIT_FAILED if code in (EXIT_DONE, EXIT_OTHERS) and plan.unreadable else code
