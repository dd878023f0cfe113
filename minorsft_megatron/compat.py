"""Workarounds for megatron-core bugs that this package's runs meet, installed once per process by
`device.setup_device` (through `apply()`), each naming the megatron-core code it answers. The CPU redirections
themselves are in device.py.

megatron-core's DistributedOptimizer on torch's Adam (no Apex and no Transformer Engine: every CPU run, and GPUs
without them; with TE its FusedAdam keeps the step in param_groups and none of this applies) cannot resume:
1. It builds the sharded state dict it loads into by calling `state_dict()`, which reads every parameter's Adam
   `step` (`assert len(steps) == 1`); torch creates that state only when it steps, so a checkpoint cannot be
   loaded before the first step. -> allocate the state as a first step would (zeros, step 0).
2. `load_state_dict` restores the step into one tensor shared by every parameter (torch's Adam then increments
   it once per parameter), and the dp_reshardable loader copies the pre-load step over it (`step` is a
   LocalNonpersistentObject in `sharded_param_state_dp_reshardable`): the next step's bias correction is wrong.
   -> give each parameter its own step tensor at the saved step.
3. `_set_main_param_and_optimizer_states` copies every key of the parameter's optimizer state from the
   checkpoint, which (fully_reshardable) holds no `step`: KeyError. -> copy the other keys.
"""

from __future__ import annotations

import functools

import torch

_applied = False


def _torch_adam(distributed_optimizer):
    """The torch Adam inside a DistributedOptimizer, or None (Apex's or Transformer Engine's)."""
    inner = getattr(distributed_optimizer, "optimizer", None)
    return inner if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) else None


def _allocating_adam_state(sharded_state_dict):
    @functools.wraps(sharded_state_dict)
    def wrapped(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        adam = _torch_adam(self)
        if is_loading and adam is not None and not adam.state:
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


def apply() -> None:
    """Install the workarounds above into megatron-core (once per process)."""
    global _applied
    if _applied:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as D

    D.sharded_state_dict = _allocating_adam_state(D.sharded_state_dict)
    D.load_state_dict = _restoring_adam_steps(D.load_state_dict)
    D._set_main_param_and_optimizer_states = _skipping_adam_step(D._set_main_param_and_optimizer_states)
    _applied = True
