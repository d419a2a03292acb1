"""Preemption: SIGTERM / SIGUSR1 set a flag the training loop polls at step boundaries (it then saves and exits 0),
and start a watchdog that ends the process `grace` seconds later whatever it is still doing (a long checkpoint
write, a stuck collective), so a preemption notice of a few seconds is honoured. The previous checkpoint is never
touched by either."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

EXIT_GRACE_EXPIRED = 128 + signal.SIGTERM  # what a shell reports for a process a SIGTERM ended


class Preemption:
    """The signal flag of one run and its grace watchdog; `install()` before the loop, `restore()` after it."""

    def __init__(self, grace: float, last_checkpoint: Callable[[], object]) -> None:
        self.grace = grace
        self.last_checkpoint = last_checkpoint
        self.received: str | None = None
        self._old: dict = {}
        self._timer: threading.Timer | None = None

    def install(self) -> None:
        """SIGTERM and SIGUSR1 set `received` (main thread only: Python delivers signals there)."""
        if threading.current_thread() is threading.main_thread():
            self._old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _on_signal(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name
        if self.grace > 0 and self._timer is None:
            self._timer = threading.Timer(self.grace, self._expired)
            self._timer.daemon = True
            self._timer.start()

    def _expired(self) -> None:
        """The grace period is over: one line (on a line of its own, after a progress bar), then exit at once."""
        print(f"\nerror: {self.received} {self.grace:g} s ago and the run has not stopped (raise --preempt-grace for "
              f"a slower checkpoint): exiting now; last checkpoint {self.last_checkpoint() or 'none'}",
              file=sys.stderr, flush=True)
        os._exit(EXIT_GRACE_EXPIRED)

    def restore(self) -> None:
        """Cancel the watchdog and put the previous handlers back."""
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
