"""What differs between the megatron-core versions this package supports, and workarounds for megatron-core bugs
its runs meet: installed once per process by `device.setup_device` (through `apply()`), each naming the
megatron-core code it answers. The CPU redirections themselves are in device.py; docs/megatron-versions.md says
what changed between the versions.

Supported and tested: megatron-core 0.16 (from 0.16.1) and 0.19. 0.17 and 0.18 are refused (never tested).

megatron-core's DistributedOptimizer on torch's Adam (no Apex and no Transformer Engine: every CPU run, and GPUs
without them; with TE its FusedAdam keeps the step in param_groups and none of this applies) cannot resume:
1. It builds the sharded state dict it saves, or loads into, by calling `state_dict()`, which reads every
   parameter's Adam `step` (`assert len(steps) == 1`); torch creates that state only when it steps, so a
   checkpoint can be neither loaded before the first step nor saved before it (an fp16 run whose first steps
   overflow and are skipped, saving at an interval or on a stop signal). -> allocate the state a first step would
   find (zeros, step 0: torch's Adam then steps exactly as from no state).
2. `load_state_dict` restores the step into one tensor shared by every parameter (torch's Adam then increments
   it once per parameter), and the dp_reshardable loader copies the pre-load step over it (`step` is a
   LocalNonpersistentObject in `sharded_param_state_dp_reshardable`): the next step's bias correction is wrong.
   -> give each parameter its own step tensor at the saved step.
3. `_set_main_param_and_optimizer_states` copies every key of the parameter's optimizer state from the
   checkpoint, which (fully_reshardable) holds no `step`: KeyError. -> copy the other keys.

megatron-core 0.19 matches a checkpoint's optimizer parameter groups to the current ones by their values, peak and
floor learning rates and weight decays included (`_filter_and_reorder_param_groups`), so a resume that recomputes
the schedule from a new lr (checkpoint.override_schedule) fails to load. -> `with_current_schedule` gives the
loaded groups the current optimizer's values first (the schedule is recomputed from them anyway).

megatron-core's checkpoint writer starts a multiprocessing Manager (a spawned server process) at a process's first
save (`_get_write_results_queue` in 0.16, `get_write_results_queue` in 0.19) and keeps its queue in the module's
`_results_queue`. Two things go wrong with it:
1. A terminal's Ctrl-C reaches it too, and it prints a KeyboardInterrupt traceback. -> start it with SIGINT ignored
   (kept across its exec), so that the ranks alone report the interrupt; the rank ignores SIGINT only during the
   fork-exec itself, not while the server starts up (a rank that lost the signal then would wait at the next
   barrier for a peer that has gone).
2. Only a rank's normal exit shuts it down: a rank that is killed, or ends with os._exit, leaves the server running
   for good (about 270 MB, reparented to init; the test suite's crash tests left two per run). -> start it with
   an initializer that has the kernel end it when its rank dies (lifetime.die_with_parent).
Both by starting the Manager ourselves, on the rank's main thread (elsewhere megatron-core's own start runs), and
handing its queue to megatron-core's global before its function looks.

megatron-core's MoE router GEMM (`RouterGatingLinearFunction` in moe/moe_utils.py, 0.16 and 0.19) tests
`te_general_gemm is not None`, but that name is bound only when Transformer Engine imports: without TE the router
raises NameError. -> bind it to None there, so the router takes its torch branch (`torch.mm` in the router dtype).

megatron-core's routers record their auxiliary losses per layer (the loss over its coefficient, summed over the
micro-batches of a step) in a layer-wise tracker (0.16: the dict of `get_moe_layer_wise_logging_tracker()`; 0.19:
`moe_logging.get_moe_metrics_tracker()`, the 0.16 names deprecated): `moe_tracked_losses` and `clear_moe_tracked_losses`
read and clear either.

megatron-core's router z-loss with a padding mask (`z_loss_func`, 0.16 and 0.19) is each rank's mean over its own
valid positions, and `apply_z_loss` divides the coefficient by the TP x CP size so that the ranks' sum averages
those means: with sequence or context parallelism the ranks hold different numbers of valid positions, so the
result is not the micro-batch's mean and changes with TP and CP (measured: 6.387 against 6.161 at TP 2 with SP).
-> while a router applies its z-loss, scale each rank's mean by its valid count over the micro-batch's (one scalar
all-reduce over the router's TP x CP group): the ranks' sum is then the mean over the micro-batch's valid positions.
"""

from __future__ import annotations

import functools
import importlib
import logging
import multiprocessing.managers
import multiprocessing.util
import os
import signal
import threading

import torch

from minorsft_megatron.errors import UserError
from minorsft_megatron.lifetime import die_with_parent

_applied = False
SUPPORTED = ((0, 16, 1), (0, 16, 99)), ((0, 19, 0), (0, 19, 99))
"""Inclusive (lowest, highest) version ranges this package is tested on."""
SUPPORTED_TEXT = "0.16.x (from 0.16.1) or 0.19.x"

# Notices megatron-core 0.19 logs that a user of this package cannot act on (docs/megatron-versions.md):
QUIET_FROM_0_19 = {
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",  # every GPTModel built; see the HybridModel note
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",  # its own sync save
}


class MegatronVersionError(UserError):
    """The installed megatron-core is not one this package supports; one line saying which to install."""


def megatron_version() -> tuple[int, int, int]:
    from importlib.metadata import version

    parts = version("megatron-core").split("+")[0].split(".")
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in (parts + ["0", "0"])[:3])


def check_megatron_version(installed: tuple[int, int, int] | None = None) -> None:
    """Refuse a megatron-core outside SUPPORTED, before any work."""
    installed = installed or megatron_version()
    if not any(low <= installed <= high for low, high in SUPPORTED):
        raise MegatronVersionError(
            f"megatron-core {'.'.join(map(str, installed))} is installed; minorsft-megatron supports and tests "
            f"{SUPPORTED_TEXT}: pip install 'megatron-core==0.16.1' (Python 3.10/3.11) or 'megatron-core==0.19.2'")


def _torch_adam(distributed_optimizer):
    """The torch Adam inside a DistributedOptimizer, or None (Apex's or Transformer Engine's)."""
    inner = getattr(distributed_optimizer, "optimizer", None)
    return inner if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) else None


def _allocating_adam_state(sharded_state_dict):
    @functools.wraps(sharded_state_dict)
    def wrapped(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        adam = _torch_adam(self)
        if adam is not None and not adam.state:
            for group in adam.param_groups:
                for param in group["params"]:
                    adam.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                         "exp_avg_sq": torch.zeros_like(param)}
        return sharded_state_dict(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    return wrapped


def _restoring_adam_steps(load_state_dict):
    @functools.wraps(load_state_dict)
    def wrapped(self, state_dict):
        load_state_dict(self, state_dict)
        adam = _torch_adam(self)
        if adam is None or "optimizer" not in state_dict:
            return
        (step,) = {group["step"] for group in state_dict["optimizer"]["param_groups"]}  # one for all groups
        for param_state in adam.state.values():
            param_state["step"] = torch.tensor(float(step))

    return wrapped


def _skipping_adam_step(set_states):
    @functools.wraps(set_states)
    def wrapped(self, model_param, tensors):
        adam = _torch_adam(self)
        if adam is None or "step" in tensors:
            return set_states(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = adam.state[adam.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            return set_states(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    return wrapped


SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")
"""What a parameter group carries of the learning-rate and weight-decay schedule."""


def with_current_schedule(loaded, current_groups: list[dict]):
    """`loaded` (an optimizer state dict, however nested) with the schedule values of each parameter group taken
    from the current group of the same kind (the same lr and wd multipliers, in order)."""
    if isinstance(loaded, list):
        return [with_current_schedule(item, current_groups) for item in loaded]
    if not isinstance(loaded, dict):
        return loaded
    out = {key: with_current_schedule(value, current_groups) for key, value in loaded.items() if key != "param_groups"}
    if isinstance(loaded.get("param_groups"), list):
        kinds = [_group_kind(group) for group in current_groups]
        out["param_groups"] = [_with_values_of(group, current_groups[kinds.index(_group_kind(group))])
                               if _group_kind(group) in kinds else group for group in loaded["param_groups"]]
    return out


def _group_kind(group: dict) -> tuple:
    return tuple(group.get(key) for key in ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr"))


def _with_values_of(group: dict, current: dict) -> dict:
    return {**group, **{key: current[key] for key in SCHEDULE_KEYS if key in current and key in group}}


def _quiet(logger_name: str, prefix: str) -> None:
    logging.getLogger(logger_name).addFilter(lambda record: not record.getMessage().startswith(prefix))


def _writer_queue_dying_with_rank(get_queue, writer):
    """megatron-core's `get_queue`, its Manager first started here (see the module docstring)."""
    @functools.wraps(get_queue)
    def wrapped(*args, **kwargs):
        if writer._results_queue is None and threading.current_thread() is threading.main_thread():
            mode = args[0] if args else kwargs.get("mp_mode", "spawn")  # 0.19's argument; 0.16 always spawns
            manager = multiprocessing.managers.SyncManager(ctx=multiprocessing.get_context(mode))
            spawn = multiprocessing.util.spawnv_passfds
            multiprocessing.util.spawnv_passfds = _sigint_ignored(spawn)
            try:
                manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
            finally:
                multiprocessing.util.spawnv_passfds = spawn
            writer._results_queue = manager.Queue()  # the proxy keeps its manager alive, as megatron-core's does
        return get_queue(*args, **kwargs)

    return wrapped


def _sigint_ignored(call):
    @functools.wraps(call)
    def wrapped(*args, **kwargs):
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return call(*args, **kwargs)
        finally:
            signal.signal(signal.SIGINT, previous)

    return wrapped


def _checkpoint_writer_manager() -> None:
    writer = importlib.import_module("megatron.core.dist_checkpointing.strategies.filesystem_async")
    name = "get_write_results_queue" if hasattr(writer, "get_write_results_queue") else "_get_write_results_queue"
    setattr(writer, name, _writer_queue_dying_with_rank(getattr(writer, name), writer))


def _router_gemm_without_te() -> None:
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _z_loss_over_the_micro_batch() -> None:
    router = importlib.import_module("megatron.core.transformer.moe.router")
    per_rank_z_loss, apply_z_loss = router.z_loss_func, router.TopKRouter.apply_z_loss
    applying = threading.local()  # the TP x CP group of the router applying its z-loss now

    def z_loss_func(logits, z_loss_coeff, padding_mask=None):
        z_loss = per_rank_z_loss(logits, z_loss_coeff, padding_mask=padding_mask)
        group = getattr(applying, "group", None)
        if padding_mask is None or group is None or group.size() == 1:
            return z_loss
        local = (~padding_mask).sum().float()
        total = local.clone()
        torch.distributed.all_reduce(total, group=group)
        return z_loss * local.clamp(min=1) * group.size() / total.clamp(min=1)

    def apply_z_loss_over_the_micro_batch(self, logits, padding_mask=None):
        applying.group = self.tp_cp_group
        try:
            return apply_z_loss(self, logits, padding_mask=padding_mask)
        finally:
            applying.group = None

    router.z_loss_func = z_loss_func
    router.TopKRouter.apply_z_loss = apply_z_loss_over_the_micro_batch


def _moe_metrics_tracker():
    """0.19's tracker object, or None on 0.16."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        return None
    return get_moe_metrics_tracker()


def moe_tracked_losses() -> dict[str, torch.Tensor]:
    """{name: [num_layers] values} of megatron-core's per-layer auxiliary-loss record since it was last cleared
    (names `load_balancing_loss`, `z_loss`; values indexed by global layer number - 1; only what this rank's routers
    recorded)."""
    tracker = _moe_metrics_tracker()
    if tracker is not None:
        return {name: entry.values for name, entry in tracker.metrics.items()}
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    return {name: entry["values"] for name, entry in get_moe_layer_wise_logging_tracker().items()}


def clear_moe_tracked_losses() -> None:
    for values in moe_tracked_losses().values():
        values.zero_()


def apply() -> None:
    """Check the version, then install the workarounds above into megatron-core (once per process)."""
    global _applied
    if _applied:
        return
    check_megatron_version()
    if megatron_version() >= (0, 19, 0):
        for logger_name, prefix in QUIET_FROM_0_19.items():
            _quiet(logger_name, prefix)
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as D

    D.sharded_state_dict = _allocating_adam_state(D.sharded_state_dict)
    D.load_state_dict = _restoring_adam_steps(D.load_state_dict)
    D._set_main_param_and_optimizer_states = _skipping_adam_step(D._set_main_param_and_optimizer_states)
    _checkpoint_writer_manager()
    _router_gemm_without_te()
    _z_loss_over_the_micro_batch()
    _applied = True
