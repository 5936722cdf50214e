"""Progress of a run: a rich bar on a terminal; elsewhere (cron, Slurm) timestamped plain lines: what is run, one
line every `log_every_s` whether or not rows finished (so a stalled run shows it), and the summary. An engine
process among several counts without showing anything but its notes, each prefixed by its name: its launcher
shows one display for the node."""

import sys
import threading
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class Progress:
    def __init__(self, units: int, rows: int, log_every_s: float, stream=None, label: str | None = None,
                 show: bool = True):
        self.stream = stream or sys.stderr
        self.prefix, self.show = f"{label}: " if label else "", show
        self.units, self.total, self.every = units, rows, log_every_s
        self.rows = self.errors = 0
        self.start = self.last_row = time.time()
        self.console = Console(file=self.stream)
        self.bar = self.ticker = None
        self.closed = threading.Event()

    def announce(self, config: str, out: str, device: str, workers: int, engines: int = 1) -> None:
        """The start line: before the model loads, which can take minutes. `workers`: per engine process."""
        if engines > 1:
            prep = f"{plural(workers, 'prep worker')} each" if workers else "prep in each engine process"
            where = f"{engines} engine processes on {device}"
        else:
            prep = plural(workers, "prep worker") if workers else "prep in the main process"
            where = f"on {device}"
        self.note(f"run {config} -> {out}: {plural(self.units, 'unit')} ({plural(self.total, 'row')}) to do, "
                  f"{where}, {prep}")

    def begin(self) -> None:
        """Scoring starts: the clock of the rate, and the bar or the log timer."""
        self.start = self.last_row = time.time()
        if not self.show:
            return
        if self.stream.isatty():
            self.bar = Bar(TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[rate]:.1f} rows/s  errors {task.fields[errors]}"),
                           TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task("rows", total=self.total, rate=0.0, errors=0)
            self.bar.start()
        else:
            self.ticker = threading.Thread(target=self.tick, name="po-batch-progress", daemon=True)
            self.ticker.start()

    def rate(self) -> float:
        return self.rows / max(time.time() - self.start, 1e-9)

    def advance(self, rows: int, errors: int) -> None:
        self.rows += rows
        self.errors += errors
        self.last_row = time.time()
        if self.bar:
            self.bar.update(self.task, advance=rows, rate=self.rate(), errors=self.errors)

    def tick(self) -> None:
        while not self.closed.wait(self.every):
            rate, idle = self.rate(), time.time() - self.last_row
            eta = f"{(self.total - self.rows) / rate / 60:.1f} min" if rate else "unknown"
            stalled = f", no row finished for {idle:.1f} s" if idle >= self.every else ""
            self.note(f"{self.rows}/{plural(self.total, 'row')} ({100 * self.rows / max(self.total, 1):.1f}%), "
                      f"{plural(self.errors, 'row error')}, {rate:.1f} rows/s, eta {eta}{stalled}")

    def note(self, line: str) -> None:
        line = self.prefix + line
        if self.stream.isatty():
            self.console.print(line, markup=False, highlight=False)
        else:  # one write per line: the timer thread and a signal handler may both log
            self.stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} po-batch: {line}\n")
            self.stream.flush()

    def close(self) -> None:
        self.closed.set()
        if self.ticker:
            self.ticker.join()
        if self.bar:
            self.bar.stop()

    def summary(self, stats, wall_s: float, out: str, code: int, engines: list[str] = ()) -> None:
        """`engines`: what each engine process of a node did, one short phrase each."""
        errored = sum(stats.errors.values())
        kinds = ", ".join(f"{k} {n}" for k, n in stats.errors.most_common())
        state = {0: "done", 3: "stopped by a signal (rerun to resume)",
                 4: "done here, other workers hold the rest"}.get(code, "failed")
        self.note(f"run {state}: {plural(stats.units, 'unit')} committed, {plural(stats.failed_units, 'unit')} "
                  f"failed; {plural(stats.rows - errored, 'row')} scored, {plural(errored, 'row error')}"
                  + (f" ({kinds})" if kinds else ""))
        self.console.print(
            f"  throughput     {stats.rows / max(wall_s, 1e-9):.1f} rows/s over {wall_s:.1f} s\n"
            f"  scoring thread waited {stats.wait_prep_s:.1f} s for prep, {stats.wait_device_s:.1f} s for the device; "
            f"queuing device work took {stats.launch_s:.1f} s\n"
            + (f"  per engine     {', '.join(engines)}\n" if engines else "") +
            f"  output         {out}  (read it with pyarrow.dataset.dataset({out!r}))",
            markup=False, highlight=False, soft_wrap=True)
