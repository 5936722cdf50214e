"""A run's progress on real streams: off a terminal (a file) timestamped lines, one every log_every_s even while no
row finishes, and a summary that counts units and rows with plural forms; on a terminal (a pty) the bar alone."""

import collections
import os
import pty
import re
import select
import time

import pytest

from po_batch.worker import RunStats
from po_batch.progress import Progress

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d po-batch: "


def test_a_line_every_period_while_no_row_finishes(tmp_path):
    log = tmp_path / "log"
    with log.open("w") as stream:
        progress = Progress(2, 40, log_every_s=0.2, stream=stream)
        progress.begin()
        progress.advance(8, 1)
        deadline = time.time() + 30
        while log.read_text().count("\n") < 3 and time.time() < deadline:
            time.sleep(0.05)
        progress.close()
    lines = log.read_text().splitlines()
    assert len(lines) >= 3, lines
    assert all(re.fullmatch(STAMP + r"8/40 rows \(20\.0%\), 1 row error, [\d.]+ rows/s, eta [\d.]+ min.*", line)
               for line in lines), lines
    assert all(line.endswith(" s") and "no row finished for" in line for line in lines[1:]), lines


@pytest.mark.parametrize("n, units, rows, errors", [
    (1, "1 unit", "1 row", "1 row error (empty 1)"),
    (2, "2 units", "2 rows", "2 row errors (empty 2)"),
])
def test_start_line_and_summary_use_plural_forms(tmp_path, n, units, rows, errors):
    log = tmp_path / "log"
    with log.open("w") as stream:
        progress = Progress(n, n, log_every_s=60, stream=stream)
        progress.announce("cfg.yaml", "out", "cpu (float32)", n)
        progress.begin()
        progress.close()
        stats = RunStats(rows=2 * n, units=n, failed_units=n, errors=collections.Counter(empty=n))
        progress.summary(stats, 1.0, "out", 1)
    start, summary, *details = log.read_text().splitlines()
    worker = "1 prep worker" if n == 1 else "2 prep workers"
    assert re.fullmatch(STAMP + re.escape(f"run cfg.yaml -> out: {units} ({rows}) to do, on cpu (float32), {worker}"),
                        start), start
    assert re.fullmatch(STAMP + re.escape(f"run failed: {units} committed, {units} failed; {rows} scored, {errors}"),
                        summary), summary
    assert details[0].startswith("  throughput")


def test_a_terminal_gets_the_bar_and_no_log_lines():
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as stream:
        progress = Progress(1, 40, log_every_s=0.05, stream=stream)
        progress.begin()
        progress.advance(8, 1)
        time.sleep(0.3)
        progress.close()
    shown = b""
    while select.select([leader], [], [], 0.5)[0]:
        try:
            shown += os.read(leader, 65536)
        except OSError:  # the terminal's other side is closed: all is read
            break
    os.close(leader)
    assert b"scoring" in shown and b"8/40" in shown, shown
    assert not re.search(STAMP.encode(), shown), shown
