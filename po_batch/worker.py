"""The worker: one engine process running claim -> read -> prep pool -> engine -> sink over the output's plan, with
its progress and signals. It does not know where it runs: an executor (launch/) starts one or many, in one process
or one per GPU, under Slurm or not, and says in a Slot what the worker's record should name.

The main thread scores; the prep pool's feeder thread reads and claims units just ahead of it; a writer thread
commits finished units; a reporter thread rewrites the worker's progress record. SIGTERM/SIGINT/SIGUSR1 (or an
executor's request, see stop.py) stop claiming, let claimed units finish and commit, and exit 3; a second signal
exits at once. A unit that cannot be read fails alone (exit 1 at the end); a commit that fails (a full disk) stops the run
at once (exit 1)."""

import collections
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from po_batch.config import Config, ConfigError, resolved_device, resolved_dtype, workers_count
from po_batch.data.claims import Claims, claim_states, default_owner, drop_done_claims
from po_batch.data.markers import scan
from po_batch.data.plan import Plan, PlanError, Unit, load_or_create_plan
from po_batch.data.readers import open_reader
from po_batch.data.readers.base import ReadError, UnitReadError
from po_batch.data.readers.parquet import check_unique_ids
from po_batch.data.sink import LostUnit, Sink, clean_orphans
from po_batch.data.store import Store, open_store
from po_batch.data.workers import prune_records, write_record
from po_batch.models.loader import ModelError
from po_batch.prep.pool import PrepPool, RowError
from po_batch.prep.prompt import PromptError
from po_batch.progress import Progress, plural
from po_batch.spec import Spec, open_spec
from po_batch.stop import Stop

# 4: this worker's slice is not all done, but nothing is left for it: other workers hold the rest (live claims,
# or claims that have not expired yet); a later run takes over whatever they leave.
EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_OTHERS = 0, 1, 2, 3, 4
# Batches queued on the device before the scoring thread waits for the oldest: two, so that a moment of
# slow prep (or a unit boundary) never leaves the device idle.
QUEUE_DEPTH = 2
# How often the worker rewrites its progress record: often enough for a launcher's display, rarely enough for a
# shared filesystem with a thousand workers
RECORD_EVERY_S = 2.0
ENDED_AS = {EXIT_DONE: "done", EXIT_OTHERS: "done", EXIT_STOPPED: "stopped"}  # exit 4: done, others hold the rest
# what means the user's input or setup is wrong (exit 2), as opposed to a failure mid-run (exit 1)
USER_ERRORS = (ConfigError, PlanError, ModelError, PromptError)


@dataclass
class Slot:
    """Where an executor put this worker, as far as the worker needs to know: the labels its progress record
    carries (gpu, engine, slurm_job, slurm_task), the cores its prep pool (and a CPU engine) may use, and whether
    it owns the display (one engine process of several leaves the progress display and the summary to its
    launcher, and prefixes its notes with `name`)."""
    labels: dict = field(default_factory=dict)
    cores: int | None = None  # None: every usable core
    display: bool = True
    name: str | None = None


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
    def __init__(self, spec: Spec, engine, store: Store, plan: Plan, shard: tuple[int, int] | None,
                 slot: Slot | None = None):
        self.cfg, self.spec, self.engine, self.plan, self.shard = spec.cfg, spec, engine, plan, shard
        self.store, self.slot = store, slot or Slot()
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
        self.tried: set[str] = set()  # units this run claimed: never claimed again by it, whatever became of them
        self.progress: Progress | None = None
        self.state = "starting"
        self.started_at = time.time()
        self.reporting = threading.Event()
        self.reporter: threading.Thread | None = None

    # --- reading (runs in the prep pool's reader thread) ---------------------------------------

    def candidates(self) -> list[Unit]:
        return slice_of(self.plan, self.shard, self.sink.done())

    def passes(self):
        """The candidates this run has not claimed yet; once all were visited they are listed again, to take over
        those whose claims were released or died meanwhile (an engine process of this node that was killed). The
        passes end with one that claims nothing."""
        claimed = True
        while claimed:
            claimed = False
            for unit in self.candidates():
                if unit.id not in self.tried:
                    yield unit
                    claimed = claimed or unit.id in self.tried

    def rows(self):
        """(key, (image, fields)) for every row of every unit this worker claims, claiming lazily."""
        id_column = self.reader.columns.id
        for unit in self.passes():
            if self.stopping:
                return
            if self.claims and not self.claims.try_claim(unit.id):
                continue
            self.tried.add(unit.id)
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
        from po_batch.engine.batch import common_rows, worth_sharing

        pool = PrepPool(self.spec.prep, self.spec.workers, inflight=max(256, 4 * self.cfg.run.batch_tokens // 64),
                        row_timeout=self.cfg.run.row_timeout_s)
        pending, tokens, lead = [], 0, 0
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
                # The rows that all of a batch's samples begin with run once (engine/batch.py), and count once.
                # `lead`: the rows all of `pending` begin with (0 while it holds one sample).
                same_unit = bool(pending) and pending[-1][0] is st
                common = 0  # the rows that all of `pending` and this sample begin with
                if same_unit:
                    common = common_rows(pending[0][3], result, self.engine.image_token_id)
                    common = min(common, lead) if len(pending) > 1 else common
                if pending and (not same_unit or tokens + result.tokens - len(pending) * worth_sharing(common)
                                > self.cfg.run.batch_tokens):
                    self.score(pending, progress, worth_sharing(lead))
                    pending, tokens = [], 0
                lead = common if pending else 0
                pending.append((st, i, n, result))
                tokens += result.tokens
            self.score(pending, progress, worth_sharing(lead))
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

    def score(self, pending, progress: Progress, shared: int = 0) -> None:
        """Queue `pending` on the device, then collect the oldest batches beyond QUEUE_DEPTH: the device always
        has work queued while the host reads results and prepares more. `shared`: the rows all of them begin with
        (engine/batch.py shared_prefix)."""
        if pending:
            t = time.perf_counter()
            self.inflight.append((self.engine.launch([s for _, _, _, s in pending], shared), pending))
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


    # --- the progress record (reporter thread) ---------------------------------------------------

    def report(self, state: str | None = None, code: int | None = None) -> None:
        """Rewrite this worker's record (data/workers.py); with the exit code, the final one, with its stats."""
        self.state = state or self.state
        p, now = self.progress, time.time()
        doc = {"owner": self.owner, "epoch": self.plan.epoch, "host": socket.gethostname(), "pid": os.getpid(),
               **self.slot.labels, "device": self.spec.device, "state": self.state, "exit_code": code,
               "started_at": self.started_at, "scoring_at": p.start if p and self.state != "starting" else None,
               "updated_at": now,
               "progress_at": now - (time.monotonic() - self.progress_at),
               "rows": p.rows if p else 0, "row_errors": p.errors if p else 0, "rows_todo": p.total if p else None,
               "units": self.stats.units, "failed_units": self.stats.failed_units,
               "rows_per_s": p.rate() if p and self.state != "starting" else None}
        if code is not None:
            doc["stats"] = {"error_kinds": dict(self.stats.errors), "wait_prep_s": self.stats.wait_prep_s,
                            "launch_s": self.stats.launch_s, "wait_device_s": self.stats.wait_device_s}
        write_record(self.store, doc)

    def start_reporting(self) -> None:
        def beat():
            while not self.reporting.wait(RECORD_EVERY_S):
                self.report()

        self.report()
        self.reporter = threading.Thread(target=beat, name="po-batch-record", daemon=True)
        self.reporter.start()

    def stop_reporting(self, code: int) -> None:
        self.reporting.set()
        if self.reporter is not None:
            self.reporter.join()
        self.report(ENDED_AS.get(code, "failed"), code)


def slice_of(plan: Plan, shard: tuple[int, int] | None, done: set[str]) -> list[Unit]:
    """The units of `shard` (I/N: every Nth from the Ith; None: all) not in `done`."""
    i, n = shard or (0, 1)
    return [u for k, u in enumerate(plan.units) if k % n == i and u.id not in done]


def left_to_others(n: int) -> str:
    return (f"{plural(n, 'unit')} left to the other workers that claimed them (exit 4); a later run takes over any "
            f"they do not commit")


def work_left(cfg: Config, store: Store, plan: Plan, shard: tuple[int, int] | None,
              say: bool = True) -> tuple[list[Unit], int | None]:
    """The units of the slice not done, and the exit code of a run that can do none of them: all done, or every one
    held by a live claim of another worker (then the model need not load: the tail of a large array, a task
    requeued after the others took the rest). `say`: print why, and which inputs were left out of the plan."""
    if say:
        for path, why in plan.unreadable.items():
            print(f"po-batch: input {path} is left out: {why}", file=sys.stderr)
    todo = slice_of(plan, shard, scan(store, plan.epoch).done)
    code = EXIT_FAILED if plan.unreadable else None
    if not todo:
        if say:
            print(f"nothing to do: every unit of {cfg.output.path} is done ({plural(len(plan.units), 'unit')})")
        return todo, code or EXIT_DONE
    if not shard:
        states = claim_states(store, plan.epoch, cfg.run.claim_ttl_s)
        if all(states.get(u.id) == "live" for u in todo):
            if say:
                print(f"po-batch: {left_to_others(len(todo))}", file=sys.stderr)
            return todo, code or EXIT_OTHERS
    return todo, None


def open_output(cfg: Config, spec: Spec, restart: bool) -> tuple[Store, Plan]:
    """Plan or resume the output (safe between processes: the plan lock), and clear what crashed workers left."""
    store = open_store(cfg.output.path)
    reader = open_reader(cfg.input)
    plan = load_or_create_plan(store, cfg.input.paths, cfg.run.rows_per_unit, spec.fingerprint(), restart,
                               reader.columns, reader)
    clean_orphans(store)
    drop_done_claims(store, plan.epoch)
    prune_records(store, plan.epoch)
    return store, plan


def run(cfg: Config, restart: bool = False, shard: tuple[int, int] | None = None, stats: RunStats | None = None,
        config_path: str = "a config built in code", slot: Slot | None = None, stop: Stop | None = None) -> int:
    """Plan or resume, score every unclaimed unit of the slice, commit each; returns the exit code.
    `stats`, when given, is filled in as the run goes (benchmarks read it); `config_path` names the run in its log;
    `slot` is where an executor put the worker; `stop` says afterwards why the run stopped early (and takes an
    executor's requests to stop). Signals are handled from the start: one during planning or the model's load
    stops the run before it claims."""
    stop = stop or Stop()
    previous = stop.install()
    try:
        return _run(cfg, restart, shard, stats, config_path, slot or Slot(), stop)
    finally:
        stop.restore(previous)


def _run(cfg: Config, restart, shard, stats, config_path: str, slot: Slot, stop: Stop) -> int:
    import torch

    device = resolved_device(cfg, torch.cuda.is_available())
    dtype = resolved_dtype(cfg, device)
    cores = slot.cores or len(os.sched_getaffinity(0))
    if device == "cpu" and slot.cores:  # a CPU engine among several keeps to its share of the cores
        torch.set_num_threads(slot.cores)
    spec = open_spec(cfg, device, dtype, workers_count(cfg, cores))
    store, plan = open_output(cfg, spec, restart)
    runner = Runner(spec, None, store, plan, shard, slot)
    stop.listen(lambda _: setattr(runner, "stopping", True))
    if stats is not None:
        runner.stats = stats
    todo, code = work_left(cfg, store, plan, shard, slot.display)
    if code is not None:
        return code
    progress = runner.progress = Progress(len(todo), sum(u.rows for u in todo), cfg.run.log_every_s,
                                          label=slot.name, show=slot.display)
    if stop.reason is None:  # else the note below says it
        stop.listen(lambda reason: progress.note(f"{reason}: finishing claimed units, then stopping"))
    if slot.display:
        progress.announce(config_path, cfg.output.path, f"{device} ({dtype})", spec.workers)
    runner.start_reporting()
    code = EXIT_FAILED
    try:
        runner.engine = spec.load_engine()
        if stop.reason is not None:
            progress.note(f"{stop.reason} before the first unit: stopping")
            code = EXIT_STOPPED
            return code
        runner.report("running")
        progress.begin()
        started = time.time()
        try:
            code = runner.run(progress)
        except Exception:  # what was committed stays; say how far the run got before the error is reported
            progress.close()
            if slot.display:
                progress.summary(runner.stats, time.time() - started, cfg.output.path, EXIT_FAILED)
            raise
    finally:
        runner.stop_reporting(code)
    progress.close()
    if slot.display:
        progress.summary(runner.stats, time.time() - started, cfg.output.path, code)
    if code == EXIT_OTHERS and slot.display:
        progress.note(left_to_others(runner.left))
    return EXIT_FAILED if code in (EXIT_DONE, EXIT_OTHERS) and plan.unreadable else code
