"""The one module that knows whether megatron-core runs on CUDA or on CPU processes.

megatron-core 0.16 assumes CUDA in a few places (see docs/cpu.md). With no CUDA device, or when the
CPU is asked for, `setup_device("cpu")` redirects exactly these, once per process, and touches nothing else:

* device placement: ``torch.cuda.current_device()`` answers the CPU device, and in the modules that
  write ``device="cuda"`` literally (``_MODULES_WITH_LITERAL_CUDA``) tensor factories read "cuda" as the
  CPU; ``Tensor.cuda()`` returns the tensor;
* the model-parallel RNG tracker: its CUDA generator states are backed by the CPU generator (and its warning
  that the CPU generator moved inside a fork is silenced: that is the generator it forks);
* CUDA synchronisation and streams: ``torch.cuda.synchronize()`` is a no-op, and every stream
  (``current_stream()``, a new ``Stream()``, ``with torch.cuda.stream(s)``) is the one in-order CPU stream;
* MoE host copies: the alltoall token dispatcher's split sizes become numpy arrays, as from a GPU.

Everything else stays real megatron-core; no other module of this package mentions the CPU case.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import types

import torch

from minorsft_megatron.errors import UserError

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
# megatron-core functions that accept a tensor only if its type name is a CUDA one ('torch.cuda.BFloat16Tensor'):
# (module, class or None, function). On the CPU they run seeing CUDA names for CPU tensors.
_CHECK_CUDA_TYPE_NAMES = (
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "__init__"),
    ("megatron.core.optimizer.clip_grads", None, "clip_grad_by_total_norm_fp32"),
)
# Modules that imported one of those functions by name, and must see the wrapped one.
_IMPORTED_BY_NAME = {"clip_grad_by_total_norm_fp32": ("megatron.core.optimizer.optimizer",)}
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "randn", "rand", "as_tensor",
    "empty_like", "zeros_like", "ones_like", "full_like",
)


def resolve_device(requested: str | None = None) -> torch.device:
    """The device this process computes on: CUDA when present unless `requested` is "cpu".

    `requested` is None (automatic), "cpu" or "cuda"; asking for "cuda" where there is none is an error.
    """
    if requested not in (None, "cpu", "cuda"):
        raise UserError(f"device must be 'cpu' or 'cuda', got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for, but no CUDA device is visible (use device=cpu, or leave it "
                        "unset)")
    if requested == "cpu" or not torch.cuda.is_available():
        return _CPU
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def setup_device(requested: str | None = None) -> torch.device:
    """Resolve the device and prepare megatron-core for it; call before building any model."""
    from minorsft_megatron import compat

    compat.apply()
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


class _NoEvent:
    """What a _NoStream records: already complete."""

    def synchronize(self):
        pass

    def wait(self, *_args):
        pass

    def query(self):
        return True


_NO_EVENT = _NoEvent()


class _NoStream:
    """What torch.cuda.current_stream() and torch.cuda.Stream() answer on the CPU: one stream, in order, nothing
    to wait for (megatron-core's alltoall token dispatcher makes a side stream for its device-to-host copies).
    A class, as torch.cuda.Stream is (annotations use it), whose every instance is the one stream."""

    _the_stream = None

    def __new__(cls, *_args, **_kwargs):
        if cls._the_stream is None:
            cls._the_stream = super().__new__(cls)
        return cls._the_stream

    def wait_event(self, *_args):
        pass

    def wait_stream(self, *_args):
        pass

    def record_event(self, *_args):
        return _NO_EVENT

    def synchronize(self):
        pass


_NO_STREAM = _NoStream()
_TENSOR_TYPE = torch.Tensor.type


def _type_named_as_on_cuda(self, dtype=None, non_blocking=False, **kwargs):
    """Tensor.type(): with no argument, a CPU tensor answers the name it would have on CUDA."""
    if dtype is None and not kwargs and self.device.type == "cpu":
        return _TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


@contextlib.contextmanager
def _cuda_type_names():
    outermost = torch.Tensor.type is _TENSOR_TYPE
    torch.Tensor.type = _type_named_as_on_cuda
    try:
        yield
    finally:
        if outermost:
            torch.Tensor.type = _TENSOR_TYPE


def _seeing_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapped


def _wrap_type_name_checks() -> None:
    for module_name, class_name, function_name in _CHECK_CUDA_TYPE_NAMES:
        module = importlib.import_module(module_name)
        owner = getattr(module, class_name) if class_name else module
        wrapped = _seeing_cuda_type_names(getattr(owner, function_name))
        setattr(owner, function_name, wrapped)
        for importer in _IMPORTED_BY_NAME.get(function_name, ()):
            setattr(importlib.import_module(importer), function_name, wrapped)


def _host_copy_on_cpu(move):
    """megatron-core's maybe_move_tensor_to_cpu, for CPU tensors too: the alltoall dispatcher's split sizes come
    back as numpy arrays (what torch.distributed's all_to_all_single accepts), as they do from a GPU."""
    @functools.wraps(move)
    def wrapped(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return wrapped


def _redirect_moe_host_copies() -> None:
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    wrapped = _host_copy_on_cpu(moe_utils.maybe_move_tensor_to_cpu)
    moe_utils.maybe_move_tensor_to_cpu = wrapped
    if hasattr(dispatcher, "maybe_move_tensor_to_cpu"):
        dispatcher.maybe_move_tensor_to_cpu = wrapped


def _redirect_megatron_to_cpu() -> None:
    global _redirected
    if _redirected:
        return
    if torch.cuda.is_available():
        raise RuntimeError("refusing to redirect megatron-core to the CPU in a process that sees CUDA")
    # Device placement and synchronisation.
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NO_STREAM
    torch.cuda.Stream = _NoStream
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    # RNG: the CUDA generator the tracker forks is the CPU generator.
    torch.cuda.get_rng_state = _cpu_rng_state
    torch.cuda.set_rng_state = _set_cpu_rng_state
    torch.cuda.manual_seed = _seed_cpu_generator
    torch.cuda.manual_seed_all = lambda seed: None  # no CUDA generators exist
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = _cpu_rng_state
    mp_random._set_cuda_rng_state = _set_cpu_rng_state
    # The tracker's fork() warns when the CPU generator moved inside it: here it is the generator it forks.
    logging.getLogger(mp_random.__name__).addFilter(
        lambda record: record.getMessage() != "CPU RNG state changed within GPU RNG context")
    # Literal device="cuda" in these modules.
    torch_on_cpu = _TorchOnCpu()
    for name in _MODULES_WITH_LITERAL_CUDA:
        importlib.import_module(name).torch = torch_on_cpu
    # The optimizers and gradient clipping accept only tensors whose type name is a CUDA one.
    _wrap_type_name_checks()
    _redirect_moe_host_copies()
    _redirected = True


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA's max allocated on a GPU, the resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30
