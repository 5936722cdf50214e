"""Stop: why and whether a run ends early. SIGTERM, SIGINT and SIGUSR1 (Slurm's warning before the time limit) ask
for a stop: stop claiming, let claimed units finish and commit, exit 3; a second TERM or INT aborts at once (a
repeated USR1 is the same warning again: Slurm warns a requeued task anew). An executor can also ask (a launcher
forwarding its own signal to its engine processes). Light on imports: a process installs it before it imports
torch, so that a signal during the imports is not the default action (USR1's kills). Child processes start with
SIGNALS blocked (`blocked`) and unblock them once their handlers are in place: a signal to the whole process group
(Slurm signals every process of a step) while one starts waits for it instead of killing it."""

import atexit
import contextlib
import os
import signal
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_EARLY: list[int] = []  # SIGUSR1s that came before a Stop was installed


def hold_usr1() -> None:
    """Keep a SIGUSR1 (Slurm's warning before the time limit) that comes before any Stop is installed, for the
    Stop that `install`s next, instead of its default action, which kills: the CLI calls this first thing."""
    signal.signal(signal.SIGUSR1, lambda signum, _frame: _EARLY.append(signum))
    ignore_usr1_at_exit()


def ignore_usr1_at_exit() -> None:
    """At exit, ignore SIGUSR1: the interpreter's teardown (a second or more with torch loaded) restores default
    actions, and a warning then would kill a process whose run has finished (exit 138 fails a Slurm task whose
    work is all committed). Each entry point (the CLI, an engine process) calls this once."""
    atexit.register(signal.signal, signal.SIGUSR1, signal.SIG_IGN)


@contextlib.contextmanager
def blocked() -> Iterator[None]:
    """SIGNALS blocked in this thread meanwhile: a child process started in it (subprocess, multiprocessing's
    spawn) inherits the mask through exec and calls `unblock` once it handles them. This process still gets them:
    the kernel hands them to another thread, or delivers them when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def unblock() -> None:
    """In a child started under `blocked`, once its handlers are set: what came meanwhile is delivered now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


class Stop:
    """A request is never counted as a signal, so that a signal which reaches a worker both directly (a process
    group, a Slurm step) and through its launcher stops it once, and does not abort it."""

    def __init__(self):
        self.reason: str | None = None
        self.signals = 0
        self.listeners: list[Callable[[str], None]] = []  # told the reason at the first request
        self.on_abort: Callable[[], None] | None = None  # runs before a second signal's exit (a launcher's kill)

    def request(self, reason: str) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        for tell in self.listeners:
            tell(reason)

    def listen(self, tell: Callable[[str], None]) -> None:
        """Call `tell(reason)` at the first request, or now if there was one already."""
        self.listeners.append(tell)
        if self.reason is not None:
            tell(self.reason)

    def on_signal(self, signum, _frame) -> None:
        if signum != signal.SIGUSR1:  # a USR1 again is the warning again (a requeued task is warned anew)
            self.signals += 1
            if self.signals > 1:
                if self.on_abort is not None:
                    self.on_abort()
                os._exit(128 + signum)  # the claims held expire, or are seen dead, later
        self.request(signal.Signals(signum).name)

    def install(self) -> dict:
        """Handle SIGNALS from now on; returns the handlers they had, for restore."""
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, self.on_signal)
        while _EARLY:
            self.on_signal(_EARLY.pop(0), None)
        return previous

    @staticmethod
    def restore(previous: dict) -> None:
        for s, h in previous.items():
            signal.signal(s, h)
