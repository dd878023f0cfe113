"""Stopping on a signal at the next step boundary, with a checkpoint: SIGTERM (preemption, or a launcher asked to
stop) and SIGUSR1 (Slurm's `--signal=USR1@SECONDS` before the time limit, as Megatron-LM's `--exit-signal-handler`
users ask for it). The handler only records the signal; the ranks agree on it in the step's one flag all-reduce
(train.check_step), so every rank saves the same iteration and exits 0 with one line. Blocking system calls are
restarted after the handler (SA_RESTART), so a collective in flight is not cut short."""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """The last stop signal this process received (0: none)."""

    def __init__(self):
        self.received = 0

    def install(self) -> "StopRequest":
        """Take over STOP_SIGNALS in this process (only the main thread can; elsewhere nothing), for good: a
        signal that comes after the run (the launcher's copy of one Slurm also sent directly) is recorded, not
        fatal."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._record)
            signal.siginterrupt(sig, False)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by our launcher until now: one pending
        return self                                                  # since the rank started is recorded here

    def _record(self, signum, _frame) -> None:
        self.received = signum


def name(signum: int) -> str:
    return signal.Signals(signum).name
