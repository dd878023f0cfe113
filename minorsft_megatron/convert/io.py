"""The converter's shared reading, staging and writing: Hugging Face safetensors read one tensor at a time,
tensors parked in memory-mapped files, the meta model's sharded state dict (keys, shapes, layer and expert
offsets), any region of a dist-checkpoint tensor read straight from storage, and safetensors streamed out."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct

import torch

from minorsft_megatron.convert.family import ConversionError

COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


class HFReader:
    """Tensors of a Hugging Face safetensors checkpoint, read one at a time."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    files = json.load(f)["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise _unreadable(index, err)
        elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
            try:
                with safe_open(os.path.join(hf_dir, "model.safetensors"), "pt") as f:
                    files = {name: "model.safetensors" for name in f.keys()}
            except Exception as err:  # noqa: BLE001 - safetensors' own error types for a damaged header
                raise _unreadable(os.path.join(hf_dir, "model.safetensors"), err)
        else:
            raise ConversionError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        self.dir, self.files, self._open = hf_dir, files, safe_open

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ConversionError(f"{self.dir}: tensor {name} is missing")
        path = os.path.join(self.dir, self.files[name])
        try:
            with self._open(path, "pt") as f:
                return f.get_tensor(name)
        except Exception as err:  # noqa: BLE001 - a truncated shard fails in safetensors' or the OS's own ways
            raise _unreadable(path, err)


class Staging:
    """Tensors parked in memory-mapped files, so that only one lives in anonymous memory at a time."""

    def __init__(self, directory: str):
        self.dir, self.count = directory, 0
        os.makedirs(directory, exist_ok=True)

    def park(self, tensor: torch.Tensor) -> torch.Tensor:
        path = os.path.join(self.dir, f"{self.count:06d}.bin")
        self.count += 1
        mapped = torch.from_file(path, shared=True, size=tensor.numel(), dtype=tensor.dtype).view(tensor.shape)
        mapped.copy_(tensor)
        return mapped


def park_entry(entry, tensor: torch.Tensor, staging: Staging):
    """`entry` holding `tensor`, parked. A ShardedTensorFactory (SwiGLU's fc1: gate and up) is built here and
    each piece parked in a file of its own: megatron-core's writer copies any tensor that is a view into a
    larger storage, which would hold all of them in memory at once."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if not isinstance(entry, ShardedTensorFactory):
        entry.data = staging.park(tensor)
        return entry
    entry.data = tensor
    built = entry.build()

    def park(piece):
        if isinstance(piece, ShardedTensor):
            piece.data = staging.park(piece.data.contiguous())
        return piece

    return dict_list_map_inplace(park, built)


def meta_sharded_state_dict(train_cfg, vocab_size: int) -> dict:
    """megatron-core's sharded state dict of the whole model (TP = PP = 1) built on the meta device: the keys,
    shapes and layer offsets of a checkpoint, with no memory behind them."""
    from dataclasses import replace

    from minorsft_megatron.config import ParallelConfig
    from minorsft_megatron.model import checkpoint_vocab_size, gpt_from_config, transformer_config
    from minorsft_megatron.transformer_engine import RolePrecision

    model_cfg = replace(train_cfg.model, spec="local")  # the same checkpoint keys as the TE spec, no TE needed
    # The whole model, whatever layout trained it (a PP = 2 layout would build only the first stage's layers).
    config = transformer_config(model_cfg, ParallelConfig(), RolePrecision(train_cfg.precision.dtype), "meta")
    with torch.device("meta"):
        model = gpt_from_config(model_cfg, config, checkpoint_vocab_size(vocab_size), True, True)
    if train_cfg.lora.rank > 0:  # a LoRA run's adapters (small: real tensors, unlike the base's)
        from minorsft_megatron.lora import add_adapters

        add_adapters(model, train_cfg.lora, config, train_cfg.seed)
    return model.sharded_state_dict()


class _Prepared:
    """Stands in for a model in checkpoint.save: its sharded state dict is already filled."""

    def __init__(self, sharded):
        self.sharded = sharded

    def sharded_state_dict(self):
        return self.sharded


def allocate_large_tensors_with_mmap() -> None:
    """glibc raises its mmap threshold after each large free, so later tensors of a few MB come from the heap
    and freed ones are not given back: memory creeps up with the model's size. A fixed 1 MiB threshold keeps
    every tensor in its own mapping, returned on free. No-op where glibc's mallopt is absent."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def single_process_group() -> None:
    """A one-process gloo group and megatron-core parallel state (TP = PP = 1) for the conversion itself."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from minorsft_megatron import parallel
    from minorsft_megatron.device import setup_device

    if parallel_state.model_parallel_is_initialized():
        return
    allocate_large_tensors_with_mmap()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    parallel.initialize(setup_device("cpu"))


def train_config_for(model_cfg, dtype: str):
    from minorsft_megatron.config import PrecisionConfig, ReferenceConfig, TrainConfig

    return TrainConfig(model=model_cfg, precision=PrecisionConfig(dtype=dtype),
                       reference=ReferenceConfig(precision=dtype))


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir}: no config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: not valid JSON ({err})")
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: not a Hugging Face config (a JSON object)")
    return config


def _unreadable(path: str, err: Exception) -> ConversionError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return ConversionError(f"{path}: cannot be read, the file is damaged or incomplete ({first})")



@contextlib.contextmanager
def building(out: str, what: str, overwrite: bool, inputs: dict):
    """The temporary directory an output directory is built in: `out` must be new or empty (or `overwrite`) and
    no input; the result replaces `out` only once complete, and a failure leaves nothing behind."""
    from minorsft_megatron import paths

    paths.check_fresh_dir(out, what, overwrite)
    paths.check_apart({what: out}, inputs)
    paths.remove_stale_temporaries(out)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        yield tmp
        paths.replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)



class DistCheckpointReader:
    """Reads any region of a tensor of a megatron-core (torch_dist) checkpoint, whatever layout saved it, straight
    from torch.distributed.checkpoint's storage: only the chunks that overlap the region are read."""

    def __init__(self, directory: str):
        from torch.distributed.checkpoint import FileSystemReader

        self.directory = directory
        self.reader = FileSystemReader(directory)
        try:
            self.metadata = self.reader.read_metadata()
        except Exception as err:  # noqa: BLE001 - missing or damaged .metadata
            raise _unreadable(os.path.join(directory, ".metadata"), err)
        self.reader.set_up_storage_reader(self.metadata, True)

    def read(self, key: str, offsets, sizes) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        stored = self.metadata.state_dict_metadata[key]
        buffer = torch.empty(tuple(sizes), dtype=stored.properties.dtype)
        region = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, stored, [region])
        try:
            self.reader.read_data(LoadPlan(items), _IntoBuffer(buffer)).wait()
        except Exception as err:  # noqa: BLE001 - a truncated shard fails deep inside torch
            raise _unreadable(self.directory, err)
        return buffer


class _IntoBuffer:
    """The two planner calls FileSystemReader.read_data makes, aimed at one buffer."""

    def __init__(self, buffer):
        self.buffer = buffer

    def resolve_tensor(self, item):
        from torch.distributed._shard._utils import narrow_tensor_by_index

        return narrow_tensor_by_index(self.buffer, item.dest_offsets, item.lengths)

    def commit_tensor(self, item, tensor):
        pass


def _stored_tensor(entry):
    """A ShardedTensor of `entry` (a factory, SwiGLU's fc1, is built: its pieces share the leading offsets)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if not isinstance(entry, ShardedTensorFactory):
        return entry
    return next(v for v in nested_values(entry.build()) if isinstance(v, ShardedTensor))


def read_megatron_tensor(reader: DistCheckpointReader, local_key: str, entry) -> torch.Tensor:
    """The TP = PP = EP = 1 tensor `local_key` (from the meta model's sharded state dict `entry`). Its stored
    tensor may have leading axes the local one lacks: the layer (a stack of identical layers) and the expert (the
    routed experts); the meta model's offsets along them say which slice is this tensor."""
    stored, shape = _stored_tensor(entry), tuple(entry.data.shape)
    lead = len(stored.global_shape) - len(shape)
    offsets, sizes = tuple(stored.global_offset[:lead]) + (0,) * len(shape), (1,) * lead + shape
    return reader.read(stored.key, offsets, sizes).reshape(shape)


def write_safetensors(directory, names, shapes, dtype, tensors, max_shard_bytes, log) -> dict:
    """Stream `tensors` (an iterator of (name, tensor) in `names` order) into safetensors files of at most
    `max_shard_bytes` each (a bigger tensor gets a file to itself); returns the weight map name -> file."""
    size = torch.tensor([], dtype=dtype).element_size()
    shards, current, used = [], [], 0
    for name in names:
        nbytes = size * int(torch.Size(shapes[name]).numel())
        if current and used + nbytes > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    shards.append(current)
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, done = {}, 0
    for file, shard in zip(files, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in shard:
            nbytes = size * int(torch.Size(shapes[name]).numel())
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shapes[name]),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(os.path.join(directory, file), "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            for name in shard:
                got, tensor = next(tensors)
                assert got == name and tuple(tensor.shape) == shapes[name], (got, name)
                f.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
                weight_map[name] = file
                done += 1
                if done % 20 == 0 or done == len(names):
                    log(f"[{done}/{len(names)}] {name}")
    if len(files) > 1:
        total = sum(size * int(torch.Size(shapes[n]).numel()) for n in names)
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return weight_map


def write_hf_side_files(directory, state, m, dtype) -> None:
    """config.json (the original, byte for byte, unless the dtype changed), generation config, tokenizer files."""
    hf = state.get("hf") or {}
    for file, data in hf.get("files", {}).items():
        with open(os.path.join(directory, file), "wb") as f:
            f.write(data)
    from minorsft_megatron.convert.tensors import hf_config_from_model

    config = dict(hf["config"]) if hf else hf_config_from_model(m)
    name = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}[dtype]
    key = "dtype" if "dtype" in config else "torch_dtype"  # transformers 5 writes `dtype`, 4 `torch_dtype`
    if config.get(key) != name or "config.json" not in hf.get("files", {}):
        config[key] = name
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")


