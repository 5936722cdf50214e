"""The local executor: every GPU of this node, one engine process each (CUDA_VISIBLE_DEVICES per process, no NCCL),
each with its own prep pool on its share of the cores, all claiming from one plan that this launcher makes first.
With one engine the worker runs in this process. One progress display and one summary for the node, summed from
the workers' progress records. An engine process that dies is reported with its exit code and its units are
marked failed; the others go on and take them over (their claims are seen dead at once), and the node exits 1."""

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

from po_batch import worker
from po_batch.config import Config, config_to_dict, engines_count, resolved_device, resolved_dtype, workers_count
from po_batch.data.claims import claims_of, owner_prefix
from po_batch.data.markers import mark_failed, scan
from po_batch.data.workers import read_records, write_record
from po_batch.progress import Progress, plural
from po_batch.spec import open_spec
from po_batch.stop import Stop, blocked

POLL_S = 0.1  # how soon a dead engine process is reaped: until then its claims look alive to the others
READ_EVERY_S = 0.5


@dataclass
class Outcome:
    code: int
    stopped_by: str | None  # the signal (or request) that stopped the run early, if one did


def visible_gpus(count: int) -> list[str]:
    """The ids to give CUDA_VISIBLE_DEVICES, one per engine process: the entries of this process's own (Slurm
    sets it to the GPUs of the allocation), else 0..count-1."""
    seen = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in seen.split(",") if x.strip()] if seen else [str(i) for i in range(count)]
    return ids[:count]


def run(cfg: Config, restart: bool = False, shard: tuple[int, int] | None = None,
        config_path: str = "a config built in code", gpus: int | str | None = None,
        labels: dict | None = None, stop: Stop | None = None) -> Outcome:
    """`po-batch run` on this node: `gpus` overrides run.gpus; `labels` go into every worker's progress record
    (the Slurm task, from the executor that started this process); `stop`, one the caller installed early."""
    stop = stop or Stop()
    previous = stop.install()
    try:
        import torch

        device = resolved_device(cfg, torch.cuda.is_available())
        count = torch.cuda.device_count() if device == "cuda" else 0
        n = engines_count(cfg, device, count, gpus)
        ids = visible_gpus(count) if device == "cuda" else [None] * n
        labels = labels or {}
        if n == 1:
            slot = worker.Slot({**labels, "gpu": ids[0]})
            return Outcome(worker.run(cfg, restart, shard, config_path=config_path, slot=slot, stop=stop),
                           stop.reason)
        return Outcome(Node(cfg, device, ids[:n], labels, stop).run(restart, shard, config_path), stop.reason)
    finally:
        stop.restore(previous)


class Node:
    """Several engine processes of one node, and the one display that shows them."""

    def __init__(self, cfg: Config, device: str, ids: list[str | None], labels: dict, stop: Stop):
        self.cfg, self.device, self.ids, self.labels, self.stop = cfg, device, ids, labels, stop
        self.procs: list[subprocess.Popen] = []
        self.names = [f"gpu {g}" if g is not None else f"engine {k}" for k, g in enumerate(ids)]
        self.cores = max(1, len(os.sched_getaffinity(0)) // len(ids))
        stop.listen(self.forward)
        stop.on_abort = self.kill

    def forward(self, reason: str) -> None:
        for p in self.procs:
            try:
                p.stdin.write(reason + "\n")
                p.stdin.flush()
            except (BrokenPipeError, ValueError):  # it ended already
                pass

    def kill(self) -> None:
        for p in self.procs:
            p.kill()

    def run(self, restart: bool, shard: tuple[int, int] | None, config_path: str) -> int:
        cfg, n = self.cfg, len(self.ids)
        dtype = resolved_dtype(cfg, self.device)
        spec = open_spec(cfg, self.device, dtype, workers_count(cfg, self.cores))
        # planned here, once: the engine processes load this plan (a --restart here, not in each of them)
        self.store, self.plan = worker.open_output(cfg, spec, restart)
        todo, code = worker.work_left(cfg, self.store, self.plan, shard)
        if code is not None:
            return code
        progress = Progress(len(todo), sum(u.rows for u in todo), cfg.run.log_every_s)
        if self.stop.reason is None:
            self.stop.listen(lambda reason: progress.note(f"{reason}: the engine processes finish their claimed "
                                                          f"units, then stop"))
        where = f"{self.device} {','.join(self.ids)}" if self.device == "cuda" else self.device
        progress.announce(config_path, cfg.output.path, f"{where} ({dtype})", spec.workers, engines=n)
        if self.stop.reason is not None:
            progress.note(f"{self.stop.reason} before the engine processes started: stopping")
            return worker.EXIT_STOPPED
        for k in range(n):
            self.start(k, shard, config_path)
        codes = self.watch(progress)
        progress.close()
        records = self.records()
        code = self.exit_code(codes, shard)
        progress.summary(node_stats(records), time.time() - progress.start, cfg.output.path, code,
                         engines=[f"{name}: {plural(r.get('rows', 0), 'row')}" for name, r in zip(self.names, records)])
        return code

    def start(self, k: int, shard: tuple[int, int] | None, config_path: str) -> None:
        env = dict(os.environ)
        if self.ids[k] is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.ids[k]
        # engine k of n takes every n-th unit of a static shard I/N: together they cover the shard once
        sub = shard and (shard[0] + shard[1] * k, shard[1] * len(self.ids))
        job = {"config": config_to_dict(self.cfg), "config_path": config_path, "shard": sub,
               "labels": {**self.labels, "gpu": self.ids[k], "engine": k}, "cores": self.cores,
               "name": self.names[k]}
        with blocked():  # until its Stop is installed: a signal to the process group while it starts waits
            p = subprocess.Popen([sys.executable, "-m", "po_batch.launch.child"], stdin=subprocess.PIPE, env=env,
                                 text=True)
        p.stdin.write(json.dumps(job) + "\n")
        p.stdin.flush()
        self.procs.append(p)
        if self.stop.reason is not None:  # a signal came while it started
            self.forward(self.stop.reason)

    def records(self) -> list[dict]:
        """The progress record of each engine process, {} for one that wrote none."""
        mine = {(r.get("host"), r.get("pid")): r for r in read_records(self.store, self.plan.epoch)}
        return [mine.get((socket.gethostname(), p.pid), {}) for p in self.procs]

    def watch(self, progress: Progress) -> list[int]:
        """Wait for the engine processes, reporting any that dies; the display starts when the first one scores
        (the models load meanwhile) and shows the sum of their records."""
        codes: list[int | None] = [None] * len(self.procs)
        shown, begun = (0, 0), False
        last_read = 0.0
        while None in codes:
            time.sleep(POLL_S)
            for k, p in enumerate(self.procs):
                if codes[k] is None and (rc := p.poll()) is not None:
                    codes[k] = rc
                    p.stdin.close()
                    if rc not in (worker.EXIT_DONE, worker.EXIT_STOPPED, worker.EXIT_OTHERS, worker.EXIT_USAGE):
                        self.died(k, rc, progress)
            if time.monotonic() - last_read >= READ_EVERY_S or None not in codes:
                last_read = time.monotonic()
                records = self.records()
                scoring = [r["scoring_at"] for r in records if r.get("scoring_at")]
                if not begun and (scoring or None not in codes):
                    progress.begin()
                    progress.start = min(scoring, default=progress.start)
                    begun = True
                now = (sum(r.get("rows", 0) for r in records), sum(r.get("row_errors", 0) for r in records))
                if now[0] > shown[0]:
                    progress.advance(now[0] - shown[0], now[1] - shown[1])
                    shown = now
        return codes

    def died(self, k: int, rc: int, progress: Progress) -> None:
        """Say so loudly, mark the units it held failed (status shows why until another worker commits them),
        and record its death in its progress record."""
        p, name = self.procs[k], self.names[k]
        how = f"was killed by signal {-rc}" if rc < 0 else "failed"
        reason = f"engine process {name} (pid {p.pid}) {how}"
        record = self.records()[k]
        units = claims_of(self.store, p.pid)
        for unit_id in units:
            mark_failed(self.store, unit_id, self.plan.epoch, f"{reason} while scoring it",
                        record.get("owner", owner_prefix(p.pid)))
        held = f"; its {plural(len(units), 'claimed unit')} ({', '.join(units)}) go to the other engine processes" \
            if units else ""
        progress.note(f"{reason} (exit code {rc}){held}")
        if record:
            write_record(self.store, {**record, "state": "died", "exit_code": rc, "updated_at": time.time()})

    def exit_code(self, codes: list[int], shard: tuple[int, int] | None) -> int:
        if worker.EXIT_USAGE in codes:
            return worker.EXIT_USAGE
        if any(c not in (worker.EXIT_DONE, worker.EXIT_STOPPED, worker.EXIT_OTHERS) for c in codes):
            return worker.EXIT_FAILED
        if worker.EXIT_STOPPED in codes:
            return worker.EXIT_STOPPED
        if self.plan.unreadable:
            return worker.EXIT_FAILED
        # an engine process that found the rest held by a sibling still running said 4: the node's answer is
        # whether its slice is done now
        left = worker.slice_of(self.plan, shard, scan(self.store, self.plan.epoch).done)
        return worker.EXIT_OTHERS if left else worker.EXIT_DONE


def node_stats(records: list[dict]) -> worker.RunStats:
    """The node's RunStats: the sum of its engine processes' final records (rows only, for one that died)."""
    stats = worker.RunStats()
    for r in records:
        final = r.get("stats", {})
        stats.rows += r.get("rows", 0)
        stats.units += r.get("units", 0)
        stats.failed_units += r.get("failed_units", 0)
        stats.errors += Counter(final.get("error_kinds", {}))
        stats.wait_prep_s += final.get("wait_prep_s", 0.0)
        stats.launch_s += final.get("launch_s", 0.0)
        stats.wait_device_s += final.get("wait_device_s", 0.0)
    return stats
