"""The one module that knows whether megatron-core runs on CUDA or on CPU processes.

megatron-core 0.16 assumes CUDA in a few places (see docs/cpu.md). With no CUDA device, or when the
CPU is asked for, `setup_device("cpu")` redirects exactly these, once per process, and touches nothing else:

* device placement: ``torch.cuda.current_device()`` answers the CPU device, and in the modules that
  write ``device="cuda"`` literally (``_MODULES_WITH_LITERAL_CUDA``) tensor factories read "cuda" as the
  CPU; ``Tensor.cuda()`` returns the tensor;
* the model-parallel RNG tracker: its CUDA generator states are backed by the CPU generator;
* CUDA synchronisation: ``torch.cuda.synchronize()`` is a no-op.

Everything else stays real megatron-core; no other module of this package mentions the CPU case.
"""

from __future__ import annotations

import functools
import importlib
import os
import types

import torch

_CPU = torch.device("cpu")
_redirected = False

# megatron-core modules that create tensors with a literal device="cuda" or call Tensor.cuda().
_MODULES_WITH_LITERAL_CUDA = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.rerun_state_machine",
    "megatron.core.utils",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "randn", "rand", "as_tensor",
    "empty_like", "zeros_like", "ones_like", "full_like",
)


def resolve_device(requested: str | None = None) -> torch.device:
    """The device this process computes on: CUDA when present unless `requested` is "cpu".

    `requested` is None (automatic), "cpu" or "cuda"; asking for "cuda" where there is none is an error.
    """
    if requested not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is visible")
    if requested == "cpu" or not torch.cuda.is_available():
        return _CPU
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def setup_device(requested: str | None = None) -> torch.device:
    """Resolve the device and prepare megatron-core for it; call before building any model."""
    device = resolve_device(requested)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        _redirect_megatron_to_cpu()
    return device


def distributed_backend(device: torch.device) -> str:
    """The torch.distributed backend for `device`: nccl on CUDA, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def _cpu_device_arg(device):
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        return _CPU
    if isinstance(device, int):
        return _CPU
    return device


def _cpu_factory(factory):
    @functools.wraps(factory)
    def make(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device_arg(kwargs["device"])
        return factory(*args, **kwargs)

    return make


class _TorchOnCpu(types.ModuleType):
    """`torch` as seen by a megatron-core module that writes device="cuda": the same, but on the CPU."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _cpu_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.default_generator.get_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.default_generator.set_state(new_state)


def _seed_cpu_generator(seed: int) -> None:
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all, which would come back here.
    torch.default_generator.manual_seed(int(seed))


def _redirect_megatron_to_cpu() -> None:
    global _redirected
    if _redirected:
        return
    if torch.cuda.is_available():
        raise RuntimeError("refusing to redirect megatron-core to the CPU in a process that sees CUDA")
    # Device placement and synchronisation.
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    # RNG: the CUDA generator the tracker forks is the CPU generator.
    torch.cuda.get_rng_state = _cpu_rng_state
    torch.cuda.set_rng_state = _set_cpu_rng_state
    torch.cuda.manual_seed = _seed_cpu_generator
    torch.cuda.manual_seed_all = lambda seed: None  # no CUDA generators exist
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = _cpu_rng_state
    mp_random._set_cuda_rng_state = _set_cpu_rng_state
    # Literal device="cuda" in these modules.
    torch_on_cpu = _TorchOnCpu()
    for name in _MODULES_WITH_LITERAL_CUDA:
        importlib.import_module(name).torch = torch_on_cpu
    # Gradient clipping asserts `grad.type() == 'torch.cuda.FloatTensor'` before scaling in place.
    importlib.import_module("megatron.core.optimizer.optimizer").clip_grad_by_total_norm_fp32 = _clip_on_cpu
    _redirected = True


def _clip_on_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's `clip_grad_by_total_norm_fp32` for CPU tensors: scale fp32 grads by max_norm / norm."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA's max allocated on a GPU, the resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30
