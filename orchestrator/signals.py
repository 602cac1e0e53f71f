"""Stop signals of schedulers: finish the round in progress, checkpoint it, exit 0."""

from __future__ import annotations

import signal
import threading


class StopOnSignal:
    """SIGTERM or SIGUSR1 (a scheduler's preemption notice; SLURM's `--signal` before the time limit) -> finish
    the round in progress, checkpoint it and stop, so `resume=true` continues after it. Installed on the main
    thread only (Python's rule); a Tune trial runs the driver on another thread and Tune stops it itself."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))

    def __init__(self):
        self.received: str | None = None
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def arm(self) -> None:
        """Called after ray.init: Ray's core worker installs a SIGTERM handler of its own that aborts the process."""
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def disarm(self) -> None:
        for s, handler in self.previous.items():
            if handler is not None:  # None: a handler installed outside Python, which cannot be put back
                signal.signal(s, handler)
        self.previous = {}
