"""The command wrapper the tools share (train, score, generate, init_checkpoint): environment defaults for a
single process, and user errors as one line on stderr with exit status 2."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

from minorsft_megatron import parallel
from minorsft_megatron.checkpoint import CheckpointError
from minorsft_megatron.compat import MegatronVersionError, check_megatron_version
from minorsft_megatron.config import ConfigError
from minorsft_megatron.data.dataset import DataError
from minorsft_megatron.reference_cache import ReferenceCacheError

USER_ERRORS = (ConfigError, DataError, CheckpointError, ReferenceCacheError, parallel.LayoutError,
               MegatronVersionError)
"""What a user's input can cause: reported in one line, never as a traceback."""


def set_single_process_defaults() -> None:
    """The torch.distributed environment of a one-process job, where torchrun has not set it."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))


def run_main(job, extra_errors: tuple = ()) -> int:
    """Run `job()` as a command: user errors are one line on stderr (rank 0) and exit status 2."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    set_single_process_defaults()
    try:
        check_megatron_version()
        job()
    except USER_ERRORS + extra_errors as err:
        if os.environ["RANK"] == "0":
            print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            parallel.destroy()
    return 0
