"""Run a function in `world_size` fresh processes joined over torch.distributed (env://, a free port)."""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1)
    finally:
        from minorsft_megatron import parallel

        parallel.destroy()


PRELOAD = ["torch", "megatron.core", "minorsft_megatron.train", "minorsft_megatron.score",
           "minorsft_megatron.generate", "minorsft_megatron.init_checkpoint", "minorsft_megatron.convert",
           "tests.gpt_workers", "tests.train_workers"]
"""What the fork server imports once: each worker is then a fresh fork of it, with these already imported."""


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def spawn(world_size: int, fn, *args, out_dir, timeout: float = 120.0) -> list:
    """fn(*args) on ranks 0..world_size-1, each a new process forked from a server that has imported torch,
    megatron-core and the package once (no state carries from one job to the next); returns each rank's return
    value, or raises with the first error."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = _context()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, str(out_dir), fn, args))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    errors = sorted(out_dir.glob("rank*.err"))
    if errors:
        raise AssertionError(f"{errors[0].name}:\n{errors[0].read_text()}")
    if any(proc.exitcode != 0 for proc in procs):
        raise AssertionError(f"worker exit codes {[proc.exitcode for proc in procs]} (timeout {timeout}s)")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
