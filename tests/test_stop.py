"""Stop with real signals and processes: a repeated Slurm warning is not an abort (a second TERM is); a warning
while a finished command's interpreter tears down does not kill it; a child started with the signals blocked
hears one sent while Python was still starting, instead of dying of it."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from po_batch.stop import blocked


def python(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_a_repeated_warning_is_the_same_request_and_only_a_second_term_aborts():
    p = python("""
        import os, signal, sys, time
        from po_batch.stop import Stop
        s = Stop(); s.install()
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)
        print(s.reason, flush=True)  # still alive: the warnings and one TERM asked once
        os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)
        print("not aborted")
        """)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM and out.split() == ["SIGUSR1"], (p.returncode, out, err)


@pytest.mark.parametrize("entry", ["po_batch.cli", "po_batch.launch.child"])
def test_a_warning_while_a_finished_entry_point_tears_down_does_not_kill_it(entry):
    """Python restores default actions early in its teardown, and a teardown with torch loaded lasts a second or
    more: a Slurm warning then killed a task whose run had finished (exit 138, the task FAILED). The CLI and an
    engine process of the local launcher are the two entry points."""
    p = python(f"""
        import os, subprocess, time
        import {entry}

        class SlowTeardown:  # a module global: torn down after the interpreter restored default actions
            def __del__(self):
                time.sleep(2)

        slow = SlowTeardown()
        subprocess.Popen(["sh", "-c", f"sleep 0.5; kill -USR1 {{os.getpid()}}"])
        """)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, (p.returncode, out, err)


def test_a_child_started_with_the_signals_blocked_hears_one_sent_while_python_started():
    with blocked():
        p = python("""
            from po_batch.stop import Stop, unblock
            s = Stop(); s.install(); unblock()
            print(s.reason)
            """)
    p.send_signal(signal.SIGUSR1)  # at once: the child is still in exec or Python's start, long before install
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and out.split() == ["SIGUSR1"], (p.returncode, out, err)


def test_blocked_leaves_this_process_hearing_the_signals():
    got = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, _frame: got.append(signum))
    try:
        with blocked():
            os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.time() + 5
        while not got and time.time() < deadline:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert got == [signal.SIGUSR1]
