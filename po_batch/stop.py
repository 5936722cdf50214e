"""Stop: why and whether a run ends early. SIGTERM, SIGINT and SIGUSR1 (Slurm's warning before the time limit) ask
for a stop: stop claiming, let claimed units finish and commit, exit 3; a second signal aborts at once. An executor
can also ask (a launcher forwarding its own signal to its engine processes). Light on imports: a process installs
it before it imports torch, so that a signal during the imports is not the default action (USR1's kills)."""

import os
import signal
from collections.abc import Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_EARLY: list[int] = []  # SIGUSR1s that came before a Stop was installed


def hold_usr1() -> None:
    """Keep a SIGUSR1 (Slurm's warning before the time limit) that comes before any Stop is installed, for the
    Stop that `install`s next, instead of its default action, which kills: the CLI calls this first thing."""
    signal.signal(signal.SIGUSR1, lambda signum, _frame: _EARLY.append(signum))


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
