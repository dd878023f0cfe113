"""Process-group setup: torch.distributed on the device's backend, then megatron-core's parallel state."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from minorsft_megatron.errors import UserError
from minorsft_megatron.device import distributed_backend


class LayoutError(UserError):
    """A parallel layout the job's processes cannot form."""


def check_layout(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1, etp: int | None = None) -> None:
    """Refuse a layout these `world_size` processes cannot form (callable before any process group exists).
    megatron-core's two grids: tp*cp*dp*pp for attention and dense layers, etp*ep*edp*pp for the experts."""
    etp = tp if etp is None else etp
    if min(tp, pp, cp) < 1 or world_size % (tp * pp * cp):
        raise LayoutError(f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}")
    if min(ep, etp) < 1 or world_size % (etp * ep * pp):
        raise LayoutError(f"world size {world_size} is not divisible by etp*ep*pp = {etp}*{ep}*{pp} (the experts' grid)")


def initialize(
    device: torch.device,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 10,
    ep: int = 1,
    etp: int | None = None,
) -> ProcessGroupCollection:
    """Join the torchrun job (env:// rendezvous), build TP/PP/CP/DP groups (and the experts' EP/ETP/expert-DP
    groups) and seed the RNG tracker.

    The data-parallel size is what is left: world_size / (tp * pp * cp); the experts' data-parallel size
    world_size / (etp * ep * pp). etp None: tp.
    """
    if not dist.is_initialized():
        dist.init_process_group(
            backend=distributed_backend(device),
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    check_layout(dist.get_world_size(), tp, pp, cp, ep, etp)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        distributed_timeout_minutes=timeout_minutes,
    )
    model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


class RankZeroError(UserError):
    """Raised on the other ranks when work done on rank 0 alone failed (rank 0 reports it)."""


def on_rank_zero(work):
    """Run `work()` on global rank 0 only and return its result there (None elsewhere). If it raises, every rank
    raises (rank 0 its own exception, the others RankZeroError), so no rank is left waiting in a collective.
    Collective: one broadcast_object_list."""
    failure, result = None, None
    if dist.get_rank() == 0:
        try:
            result = work()
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the other ranks are told
            failure = err
    told = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(told, src=0)
    if failure is not None:
        raise failure
    if told[0] is not None:
        raise RankZeroError(f"rank 0 failed: {told[0]}")
    return result


def destroy() -> None:
    """Tear down megatron-core's groups and the default process group."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()



def is_logging_rank() -> bool:
    """The last rank: on the last pipeline stage, where losses and metrics live; it prints and writes logs."""
    return dist.get_rank() == dist.get_world_size() - 1
