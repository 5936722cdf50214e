"""Progress of a run: a rich bar on a terminal, a plain log line every few seconds elsewhere (cron, Slurm)."""

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn


class Progress:
    def __init__(self, total_rows: int, log_every_s: float, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.every = total_rows, log_every_s
        self.rows = self.errors = 0
        self.start = self.last_log = time.time()
        self.console = Console(file=self.stream)
        self.bar = None
        if self.stream.isatty():
            self.bar = Bar(TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[rate]:.1f} rows/s  errors {task.fields[errors]}"),
                           TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task("rows", total=total_rows, rate=0.0, errors=0)
            self.bar.start()

    def rate(self) -> float:
        return self.rows / max(time.time() - self.start, 1e-9)

    def advance(self, rows: int, errors: int) -> None:
        self.rows += rows
        self.errors += errors
        if self.bar:
            self.bar.update(self.task, advance=rows, rate=self.rate(), errors=self.errors)
        elif time.time() - self.last_log >= self.every:
            self.last_log = time.time()
            rate = self.rate()
            eta = (self.total - self.rows) / rate if rate else float("nan")
            self.note(f"{self.rows}/{self.total} rows ({100 * self.rows / max(self.total, 1):.1f}%), "
                      f"{self.errors} errors, {rate:.1f} rows/s, eta {eta / 60:.1f} min")

    def note(self, line: str) -> None:
        if self.bar:
            self.bar.console.print(line)
        else:
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} po-batch: {line}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()

    def summary(self, stats, wall_s: float, out: str, code: int) -> None:
        kinds = ", ".join(f"{k} {n}" for k, n in stats.errors.most_common()) or "none"
        state = {0: "done", 3: "stopped by a signal; rerun to resume"}.get(code, "failed")
        self.console.print(
            f"[bold]po-batch run {state}[/bold]\n"
            f"  rows scored    {stats.rows} in {stats.units} units ({sum(stats.errors.values())} row errors: {kinds})\n"
            f"  throughput     {stats.rows / max(wall_s, 1e-9):.1f} rows/s over {wall_s:.1f} s\n"
            f"  scoring thread waited {stats.wait_prep_s:.1f} s for prep, {stats.wait_device_s:.1f} s for the device; "
            f"queuing device work took {stats.launch_s:.1f} s\n"
            f"  output         {out}  (read it with pyarrow.dataset.dataset({out!r}))", highlight=False, soft_wrap=True)
