"""torchrun, with one line per error: `python -m minorsft_megatron.launch [torchrun options] -m MODULE [args]`.

The same options and behaviour as `torchrun` (it runs `torch.distributed.run`), except that:
- for `-m minorsft_megatron.train --config FILE [key=value ...]` the config is checked first, world size
  included, so a bad setting is one line before any process starts;
- when the first rank to fail ended with a user error (exit status 2: rank 0 has printed its one line) or was
  interrupted, it exits with that status and adds no report of its own; any other failure is reported as
  torchrun does;
- SIGTERM (preemption) and SIGUSR1 (Slurm's --signal before the time limit) are handed on to the ranks, which save
  a checkpoint at the next step boundary and exit 0 (stop_signal.py), and the agent goes on supervising them
  (torchrun would close the ranks and fail on SIGTERM, and die of SIGUSR1).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

USER_ERROR, INTERRUPTED = 2, 130
QUIET_EXIT_CODES = {USER_ERROR, INTERRUPTED, -2}  # -2: killed by SIGINT
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


def forward_stop_signals(args) -> None:
    """Take SIGTERM and SIGUSR1 from torchrun (its --signals-to-handle, which it takes over as it starts the ranks)
    and hand them on to this process's children, the ranks."""
    names = {s.name for s in FORWARDED_SIGNALS}
    args.signals_to_handle = ",".join(h for h in args.signals_to_handle.split(",") if h.strip() not in names)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, _hand_on)
        signal.siginterrupt(sig, False)


def _hand_on(signum, _frame) -> None:
    for pid in child_pids():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


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


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(argv)
    status = check_training_config(args)
    if status:
        return status
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, without its banner
    forward_stop_signals(args)
    for name in list(logging.root.manager.loggerDict):  # torch sets each elastic module's level itself
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        codes = {failure.exitcode for failure in err.failures.values()}
        if first.exitcode in QUIET_EXIT_CODES and codes <= QUIET_EXIT_CODES | {STOPPED_BY_AGENT}:
            return INTERRUPTED if first.exitcode in (INTERRUPTED, -2) else USER_ERROR
        raise
    except (SignalException, KeyboardInterrupt):
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
