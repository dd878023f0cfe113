"""The command wrapper the tools share (train, score, generate, init_checkpoint): environment defaults for a
single process, and user errors as one line on stderr with exit status 2."""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch.distributed as dist

from minorsft_megatron import parallel
from minorsft_megatron.compat import check_megatron_version
from minorsft_megatron.errors import LOST_PEER_EXIT, SEE_FIRST_FAILURE, UserError, lost_peer
from minorsft_megatron.lifetime import die_with_parent


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (a UserError, reported by run_main); usage with --help only."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def set_single_process_defaults() -> None:
    """The torch.distributed environment of a one-process job, where torchrun has not set it."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))


def run_main(job) -> int:
    """Run `job()` as a command: a user error (errors.UserError) is one line on stderr from rank 0 and exit status
    2; Ctrl-C is one line and status 130; a collective that lost its peer (another process or node died) is one
    line from each rank that saw it and status 3. Under torchrun, this rank dies with its launcher."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    set_single_process_defaults()
    die_with_launcher()
    try:
        check_megatron_version()
        job()
    except UserError as err:
        if os.environ["RANK"] == "0":
            print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ["RANK"] == "0":
            print("error: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:
        gist = lost_peer(err)
        if gist is None:
            raise
        print(f"error: rank {os.environ['RANK']} lost another rank of the job ({gist}): a process or node died; "
              f"{SEE_FIRST_FAILURE}", file=sys.stderr)
        return LOST_PEER_EXIT
    finally:
        if dist.is_initialized():
            parallel.destroy()
    return 0


def die_with_launcher() -> None:
    """Under torchrun, have the kernel end this rank when the launcher dies (SIGKILL of the agent would otherwise
    leave the ranks training on, unsupervised). Linux only; elsewhere nothing."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # SIGKILL: SIGTERM asks a rank to save and stop (stop_signal.py)
        die_with_parent(os.getppid(), signal.SIGKILL)
