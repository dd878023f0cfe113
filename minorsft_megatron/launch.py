"""torchrun, with one line per error: `python -m minorsft_megatron.launch [torchrun options] -m MODULE [args]`.

The same options and behaviour as `torchrun` (it runs `torch.distributed.run`), except that:
- for `-m minorsft_megatron.train --config FILE [key=value ...]` the config is checked first, world size
  included, so a bad setting is one line before any process starts;
- when the first rank to fail ended with a user error (exit status 2: rank 0 has printed its one line), lost
  another rank (3: another process or node died; its one line says so) or was interrupted, it exits with that
  status and adds no report of its own; a rank killed by a signal, and the rendezvous store lost (3), are one
  line each; any other failure is reported as torchrun does;
- for training, SIGTERM (preemption) and SIGUSR1 (Slurm's --signal before the time limit) are handed on to the
  ranks, which start with them blocked (one that comes while they import waits for their handler), save a
  checkpoint at the next step boundary and exit 0 (stop_signal.py); the agent goes on supervising them (torchrun
  would close the ranks and fail on SIGTERM, and die of SIGUSR1).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

from minorsft_megatron.errors import LOST_PEER_EXIT, SEE_FIRST_FAILURE

USER_ERROR, INTERRUPTED = 2, 130
QUIET_EXIT_CODES = {USER_ERROR, INTERRUPTED, -2, LOST_PEER_EXIT}  # -2: killed by SIGINT; each has its one line
STOPPED_BY_AGENT = -15  # the other ranks, which torchrun ends with SIGTERM once one has failed


def world_size(args) -> int | None:
    """nnodes x nproc_per_node when both are fixed numbers (an elastic range or 'gpu' leaves it open)."""
    nnodes, nproc = str(args.nnodes), str(args.nproc_per_node)
    low, _, high = nnodes.partition(":")
    if not nproc.isdigit() or not low.isdigit() or (high and high != low):
        return None
    return int(low) * int(nproc)


def check_training_config(args) -> int:
    """0, or 2 after printing the one-line error of the training config the command names."""
    if not (args.module and args.training_script == "minorsft_megatron.train"):
        return 0
    rest = list(args.training_script_args)
    if "--config" not in rest or rest.index("--config") + 1 >= len(rest):
        return 0
    at = rest.index("--config")
    config, overrides = rest[at + 1], [a for a in rest[:at] + rest[at + 2:] if "=" in a and not a.startswith("-")]
    from minorsft_megatron import config as config_module

    size = world_size(args)
    return config_module.main(["--config", config, *overrides] + (["--world-size", str(size)] if size else []))


FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def keep_stop_signals_from_torchrun(args) -> None:
    """Take SIGTERM and SIGUSR1 out of torchrun's --signals-to-handle (it would take them over as it starts the
    ranks): the StopForwarder installed as this process started keeps them and hands them on to the ranks."""
    names = {s.name for s in FORWARDED_SIGNALS}
    args.signals_to_handle = ",".join(h for h in args.signals_to_handle.split(",") if h.strip() not in names)


class StopForwarder:
    """SIGTERM and SIGUSR1 kept from this process's first line on, and handed on to every rank.

    The ranks start with both signals blocked (a blocked mask is inherited through fork and exec): one that comes
    while a rank still imports, from here or from Slurm signalling every process of the step, waits pending
    until the rank installs its stop handler (stop_signal.StopRequest.install unblocks them) instead of killing
    it. A thread started with the ranks hands each signal on to every child, those started later included."""

    def __init__(self):
        self.pending = (0, set())  # (the last signal, the children handed it): replaced whole, never half
        self.previous = {}

    @property
    def signum(self) -> int:
        return self.pending[0]

    def install(self) -> "StopForwarder":
        for sig in FORWARDED_SIGNALS:
            self.previous[sig] = signal.signal(sig, self)
            signal.siginterrupt(sig, False)
        return self

    def uninstall(self) -> None:
        """The handlers this process had before, back; a signal that came meanwhile is raised again."""
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: one not set from Python
        if self.signum:
            os.kill(os.getpid(), self.signum)

    def start(self) -> None:
        """Before the ranks start: the delivering thread (which receives the signals from now on), then the
        signals blocked in this thread, which starts the ranks."""
        threading.Thread(target=self._deliver, name="stop-signal-forwarder", daemon=True).start()
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)

    def __call__(self, signum, _frame) -> None:
        self.pending = (signum, set())

    def _deliver(self) -> None:
        while True:
            signum, delivered = self.pending
            for pid in child_pids() if signum else ():
                if pid not in delivered:
                    try:
                        os.kill(pid, signum)
                    except OSError:  # gone meanwhile
                        pass
                    delivered.add(pid)
            time.sleep(0.1)


def child_pids() -> list[int]:
    """This process's children (Linux: /proc/self/task/*/children)."""
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children", encoding="ascii") as f:
                pids += [int(pid) for pid in f.read().split()]
        except OSError:
            continue
    return pids


def killed_line(rank: int, failure) -> str:
    """One line for a rank that a signal ended (SIGKILL: the kernel's out-of-memory killer, or from outside)."""
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    cause = "the kernel (out of memory: see dmesg) or from outside" if failure.exitcode == -9 else "from outside"
    return f"error: rank {rank} ({node}, pid {failure.pid}) was killed by {failure.signal_name()}: {cause}"


def main(argv=None) -> int:
    forwarder = StopForwarder().install()  # first: a stop signal during the imports below is kept, not fatal
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(argv)
    status = check_training_config(args)
    if status:
        return status
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, without its banner
    if args.module and args.training_script == "minorsft_megatron.train":
        keep_stop_signals_from_torchrun(args)
        forwarder.start()
    else:
        forwarder.uninstall()  # other modules keep torchrun's handling
    for name in list(logging.root.manager.loggerDict):  # torch sets each elastic module's level itself
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as err:
        rank, first = err.get_first_failure()
        codes = {failure.exitcode for failure in err.failures.values()}
        if first.exitcode in QUIET_EXIT_CODES and codes <= QUIET_EXIT_CODES | {STOPPED_BY_AGENT}:
            return INTERRUPTED if first.exitcode in (INTERRUPTED, -2) else first.exitcode
        if first.exitcode < 0:  # a signal: no Python traceback exists to report
            if -first.exitcode != forwarder.signum:  # not the signal this agent was sent (Slurm ending the step)
                print(killed_line(rank, first), file=sys.stderr)
            return 128 - first.exitcode
        raise
    except RendezvousConnectionError:  # the agent holding the store (on the first node, or the first up) is gone
        print(f"error: lost the rendezvous store {args.rdzv_endpoint}: the agent holding it died, with its process "
              f"or node; {SEE_FIRST_FAILURE}", file=sys.stderr)
        return LOST_PEER_EXIT
    except (SignalException, KeyboardInterrupt):
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
