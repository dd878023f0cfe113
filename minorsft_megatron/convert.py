"""Hugging Face <-> Megatron checkpoints for Llama (2, 3, 3.1), Qwen2/2.5, Qwen3 and Mistral.

    python tools/convert_checkpoint.py hf-to-megatron --hf-dir DIR --out DIR [--spec local|te] [--dtype bf16|fp32] [--verify]
    python tools/convert_checkpoint.py megatron-to-hf --load DIR --out DIR [--verify]

The Megatron side is a megatron-core dist checkpoint (loads under any TP/PP) whose common state carries the
training config, the original Hugging Face config and the tokenizer/generation files; its keys are megatron-core's
own (`GPTModel.sharded_state_dict()` of a model built on the meta device), which the local spec already maps to
Transformer Engine's fused layer-norm + linear names, so one checkpoint serves both specs. The Hugging Face side
is safetensors plus config.json, generation_config.json and the tokenizer files.

Memory stays bounded by the largest tensor: Hugging Face tensors are read one at a time and staged to
memory-mapped files before the dist checkpoint is written; the other way, megatron tensors are loaded one at a
time and streamed into the safetensors file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import torch

from minorsft_megatron.errors import UserError
from minorsft_megatron.model import TORCH_DTYPES

SUPPORTED = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
}
COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}
MEGATRON_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class ConversionError(UserError):
    """A checkpoint or config the converter cannot map exactly; one line."""


# ---- configs --------------------------------------------------------------------------------------------------

def _rope(hf: dict) -> tuple[float, float | None]:
    """(rope theta, Llama 3.1 scaling factor or None), from transformers 4 (rope_theta/rope_scaling) or 5
    (rope_parameters) configs; any other scaling is refused."""
    params = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return float(theta), None
    if kind != "llama3":
        raise ConversionError(f"rope scaling type {kind!r} cannot be mapped exactly (supported: llama3)")
    for key, value in MEGATRON_ROPE.items():
        if float(scaling.get(key, value)) != value:
            raise ConversionError(f"llama3 rope scaling with {key}={scaling.get(key)} cannot be mapped exactly "
                                  f"(megatron-core fixes it at {value})")
    return float(theta), float(scaling["factor"])


def model_config_from_hf(hf: dict, spec: str = "local"):
    """config.ModelConfig for a Hugging Face config dict; ConversionError for anything not mapped exactly."""
    from minorsft_megatron.config import ModelConfig

    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise ConversionError(f"architecture {arch} is not supported; supported: {', '.join(SUPPORTED)}")
    family = SUPPORTED[arch]
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {hf['hidden_act']!r} cannot be mapped (supported: silu)")
    if hf.get("mlp_bias"):
        raise ConversionError("mlp_bias: true cannot be mapped (no MLP biases in these models)")
    if family in ("llama", "mistral", "qwen3") and hf.get("attention_bias"):
        raise ConversionError("attention_bias: true (biases on q, k, v and o) cannot be mapped; only Qwen2's "
                              "q/k/v biases are supported")
    window = hf.get("sliding_window") if (family == "mistral" or hf.get("use_sliding_window")) else None
    if window is not None and window < hf["max_position_embeddings"]:
        raise ConversionError(f"sliding_window {window} < max_position_embeddings "
                              f"{hf['max_position_embeddings']}: sliding-window attention is not supported")
    theta, scaling = _rope(hf)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return ModelConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads, num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=head_dim, vocab_size=hf["vocab_size"], max_position_embeddings=hf["max_position_embeddings"],
        rotary_base=theta, rope_scaling_factor=scaling, normalization="RMSNorm",
        norm_epsilon=hf.get("rms_norm_eps", 1e-6), activation="swiglu", add_qkv_bias=family == "qwen2",
        qk_layernorm=family == "qwen3", tie_embeddings=bool(hf.get("tie_word_embeddings", False)), spec=spec,
    )


# ---- tensor names -----------------------------------------------------------------------------------------------

def hf_names(model_cfg) -> list[str]:
    """Hugging Face tensor names of this model, in writing order."""
    names = ["model.embed_tokens.weight"]
    for i in range(model_cfg.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        if model_cfg.add_qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if model_cfg.qk_layernorm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        names += [p + "self_attn.o_proj.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    names.append("model.norm.weight")
    if not model_cfg.tie_embeddings:
        names.append("lm_head.weight")
    return names


def _head_layout(m):
    d = m.kv_channels or m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    return d, groups, m.num_attention_heads // groups


def interleave_qkv(q, k, v, m):
    """[q; k; v] rows -> megatron's per-query-group [q_g; k_g; v_g] layout (weights or biases)."""
    d, groups, per_group = _head_layout(m)
    rest = q.shape[1:]
    q = q.reshape(groups, per_group * d, *rest)
    return torch.cat([q, k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)], dim=1).reshape(-1, *rest)


def split_qkv(qkv, m):
    d, groups, per_group = _head_layout(m)
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * d, *rest)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _layer_key(local_key: str) -> tuple[int | None, str]:
    parts = local_key.split(".")
    if parts[:2] == ["decoder", "layers"]:
        return int(parts[2]), ".".join(parts[3:])
    return None, local_key


def megatron_from_hf(local_key: str, get, m, padded_vocab: int) -> torch.Tensor:
    """The megatron tensor `local_key` (a key of GPTModel.state_dict() at TP = PP = 1) from HF tensors `get(name)`."""
    layer, name = _layer_key(local_key)
    p = f"model.layers.{layer}."
    pad = lambda t: torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])  # noqa: E731
    simple = {
        "embedding.word_embeddings.weight": lambda: pad(get("model.embed_tokens.weight")),
        "output_layer.weight": lambda: pad(get("lm_head.weight")),
        "decoder.final_layernorm.weight": lambda: get("model.norm.weight"),
        "input_layernorm.weight": lambda: get(p + "input_layernorm.weight"),
        "pre_mlp_layernorm.weight": lambda: get(p + "post_attention_layernorm.weight"),
        "self_attention.q_layernorm.weight": lambda: get(p + "self_attn.q_norm.weight"),
        "self_attention.k_layernorm.weight": lambda: get(p + "self_attn.k_norm.weight"),
        "self_attention.linear_proj.weight": lambda: get(p + "self_attn.o_proj.weight"),
        "mlp.linear_fc2.weight": lambda: get(p + "mlp.down_proj.weight"),
        "mlp.linear_fc1.weight": lambda: torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
        "self_attention.linear_qkv.weight":
            lambda: interleave_qkv(*(get(p + f"self_attn.{x}_proj.weight") for x in "qkv"), m),
        "self_attention.linear_qkv.bias":
            lambda: interleave_qkv(*(get(p + f"self_attn.{x}_proj.bias") for x in "qkv"), m),
    }
    if name not in simple:
        raise ConversionError(f"no Hugging Face source for megatron tensor {local_key}")
    return simple[name]()


def hf_from_megatron(hf_name: str, get, m) -> torch.Tensor:
    """The HF tensor `hf_name` from megatron tensors `get(local_key)` (TP = PP = 1 keys)."""
    parts = hf_name.split(".")
    if hf_name == "model.embed_tokens.weight":
        return get("embedding.word_embeddings.weight")[: m.vocab_size]
    if hf_name == "lm_head.weight":
        return get("output_layer.weight")[: m.vocab_size]
    if hf_name == "model.norm.weight":
        return get("decoder.final_layernorm.weight")
    layer, rest = parts[2], ".".join(parts[3:])
    prefix = f"decoder.layers.{layer}."
    if rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"):
        kind = rest.rsplit(".", 1)[1]
        return split_qkv(get(prefix + f"self_attention.linear_qkv.{kind}"), m)["qkv".index(rest.split(".")[1][0])]
    if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        return get(prefix + "mlp.linear_fc1.weight").chunk(2)[0 if rest.startswith("mlp.gate") else 1]
    direct = {
        "input_layernorm.weight": "input_layernorm.weight",
        "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
        "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
        "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
        "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
        "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    }
    return get(prefix + direct[rest])


# ---- reading Hugging Face, staging, the meta model --------------------------------------------------------------

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


# ---- the two directions -----------------------------------------------------------------------------------------

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


def hf_to_megatron(hf_dir: str, out: str, spec: str = "local", dtype: str = "bf16", log=print,
                   overwrite: bool = False) -> str:
    """Convert; returns the checkpoint directory. Peak anonymous memory: about the largest tensor."""
    from minorsft_megatron import checkpoint

    hf_config = read_hf_config(hf_dir)
    model_cfg = model_config_from_hf(hf_config, spec)
    reader = HFReader(hf_dir)
    with building(out, "--out", overwrite, {"--hf-dir": hf_dir}) as tmp:
        write_megatron(tmp, hf_dir, hf_config, model_cfg, reader, dtype, log)
    path = checkpoint.iteration_dir(out, 0)
    log(f"wrote {path}")
    return path


def write_megatron(out: str, hf_dir: str, hf_config: dict, model_cfg, reader, dtype: str, log) -> None:
    """Every tensor of `reader`, staged to memory-mapped files, then one dist checkpoint in `out`."""
    from minorsft_megatron import checkpoint
    from minorsft_megatron.config import to_dict
    from minorsft_megatron.model import checkpoint_vocab_size

    train_cfg = train_config_for(model_cfg, dtype)
    single_process_group()
    sharded = meta_sharded_state_dict(train_cfg, model_cfg.vocab_size)
    staging = Staging(os.path.join(out, ".staging"))
    padded = checkpoint_vocab_size(model_cfg.vocab_size)
    todo = [k for k, v in sharded.items() if getattr(v, "data", None) is not None]
    try:
        for n, key in enumerate(todo, start=1):
            entry = sharded[key]
            tensor = megatron_from_hf(key, lambda name: reader.get(name).to(TORCH_DTYPES[dtype]), model_cfg, padded)
            if tuple(tensor.shape) != tuple(entry.data.shape):
                raise ConversionError(f"{key}: converted shape {tuple(tensor.shape)}, the model expects "
                                      f"{tuple(entry.data.shape)}")
            sharded[key] = park_entry(entry, tensor, staging)
            del tensor
            if n % 10 == 0 or n == len(todo):
                log(f"[{n}/{len(todo)}] {key}")
        files = {name: Path(hf_dir, name).read_bytes() for name in COPIED_FILES if Path(hf_dir, name).is_file()}
        state = {"config": to_dict(train_cfg), "vocab_size": model_cfg.vocab_size, "kind": "hf",
                 "hf": {"config": hf_config, "files": files}}
        checkpoint.save(out, 0, _Prepared(sharded), None, state)
    finally:
        shutil.rmtree(staging.dir, ignore_errors=True)


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


def read_megatron_tensor(reader: DistCheckpointReader, local_key: str, entry) -> torch.Tensor:
    """The TP = PP = 1 tensor `local_key` (from the meta model's sharded state dict `entry`)."""
    layer, _ = _layer_key(local_key)
    shape = tuple(entry.data.shape)
    if layer is None:
        return reader.read(entry.key, (0,) * len(shape), shape)
    return reader.read(entry.key, (layer,) + (0,) * len(shape), (1,) + shape)[0]


def megatron_to_hf(load: str, out: str, dtype: str | None = None, max_shard_bytes: int = 5 << 30, log=print,
                   overwrite: bool = False) -> str:
    """Convert the checkpoint at `load` (or the latest under it) to a Hugging Face directory `out`."""
    from minorsft_megatron import checkpoint
    from minorsft_megatron.config import TrainConfig, from_dict

    directory = checkpoint.resolve(load)
    state = checkpoint.read_state(directory)
    train_cfg = from_dict(TrainConfig, state["config"], f"{directory} (saved config)")
    train_cfg.model.vocab_size = train_cfg.model.vocab_size or state["vocab_size"]  # unset: the tokenizer's
    with building(out, "--out", overwrite, {"--load": load, "--load checkpoint": directory}) as tmp:
        write_hf(tmp, directory, state, train_cfg, TORCH_DTYPES[dtype or train_cfg.precision.dtype],
                 max_shard_bytes, log)
    log(f"wrote {out}")
    return out


def write_hf(out: str, directory: str, state: dict, train_cfg, out_dtype, max_shard_bytes: int, log) -> None:
    """The Hugging Face files of the checkpoint `directory` in `out`, one megatron tensor in memory at a time."""
    m = train_cfg.model
    single_process_group()
    sharded = meta_sharded_state_dict(train_cfg, state["vocab_size"])
    cache: dict[str, torch.Tensor] = {}

    reader = DistCheckpointReader(directory)

    def get(local_key):
        if local_key not in cache:
            cache.clear()  # q/k/v and gate/up come one after another: one megatron tensor held at a time
            cache[local_key] = read_megatron_tensor(reader, local_key, sharded[local_key])
        return cache[local_key]

    meta = lambda key: torch.empty(sharded[key].data.shape, device="meta")  # noqa: E731
    names = hf_names(m)
    shapes = {n: tuple(hf_from_megatron(n, meta, m).shape) for n in names}
    os.makedirs(out)
    tensors = ((n, hf_from_megatron(n, get, m).to(out_dtype).contiguous()) for n in names)
    write_safetensors(out, names, shapes, out_dtype, tensors, max_shard_bytes, log)
    write_hf_side_files(out, state, m, out_dtype)


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
    config = dict(hf["config"]) if hf else hf_config_from_model(m)
    name = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}[dtype]
    key = "dtype" if "dtype" in config else "torch_dtype"  # transformers 5 writes `dtype`, 4 `torch_dtype`
    if config.get(key) != name or "config.json" not in hf.get("files", {}):
        config[key] = name
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")


def hf_config_from_model(m) -> dict:
    """A Hugging Face config for a model that did not come from one (a random init_checkpoint, say)."""
    arch = "Qwen3ForCausalLM" if m.qk_layernorm else "Qwen2ForCausalLM" if m.add_qkv_bias else "LlamaForCausalLM"
    config = {
        "architectures": [arch], "model_type": {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2",
                                                 "LlamaForCausalLM": "llama"}[arch],
        "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "head_dim": m.kv_channels or m.hidden_size // m.num_attention_heads, "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_position_embeddings, "rms_norm_eps": m.norm_epsilon,
        "rope_theta": m.rotary_base, "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu",
    }
    if m.rope_scaling_factor is not None:
        config["rope_scaling"] = dict(MEGATRON_ROPE, rope_type="llama3", factor=m.rope_scaling_factor)
    return config


# ---- verification and command line ------------------------------------------------------------------------------

def verify(hf_dir: str, megatron_dir: str, num_sequences: int = 4, length: int = 32, log=print) -> float:
    """Largest |log-prob difference| between transformers and the Megatron checkpoint (fp32, TP = 1) on random
    sequences. Holds both models in memory: meant for a check, not for a 70B on a small machine."""
    from transformers import AutoModelForCausalLM

    from minorsft_megatron import checkpoint
    from minorsft_megatron.config import TrainConfig, from_dict
    from minorsft_megatron.model import build_model
    from minorsft_megatron.transformer_engine import RolePrecision

    single_process_group()
    state = checkpoint.read_state(megatron_dir)
    cfg = from_dict(TrainConfig, state["config"], megatron_dir)
    cfg.model.spec = "local"
    model, _ = build_model(cfg, RolePrecision(cfg.precision.dtype), state["vocab_size"], torch.device("cpu"),
                           initialize=False)
    checkpoint.load(megatron_dir, model)
    model = model.float().eval()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    vocab = state["vocab_size"]
    tokens = torch.randint(0, vocab, (num_sequences, length + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        hf_logp = hf(inputs).logits.float().log_softmax(-1).gather(-1, labels[..., None])[..., 0]
        positions = torch.arange(length).repeat(num_sequences, 1)
        logits = model(inputs, positions, attention_mask=None)[..., :vocab].float()
        mg_logp = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    diff = float((hf_logp - mg_logp).abs().max())
    log(f"verify: largest |log-prob difference| over {num_sequences} x {length} tokens: {diff:.3e}")
    return diff


def parse_args(argv=None):
    import argparse

    from minorsft_megatron.cli import ArgumentParser

    parser = ArgumentParser(prog="tools/convert_checkpoint.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    to_mg = sub.add_parser("hf-to-megatron", help="a Hugging Face directory to a megatron-core dist checkpoint")
    to_mg.add_argument("--hf-dir", required=True)
    to_mg.add_argument("--spec", choices=("local", "te"), default="local")
    to_mg.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    to_hf = sub.add_parser("megatron-to-hf", help="a megatron-core checkpoint to a Hugging Face directory")
    to_hf.add_argument("--load", required=True)
    to_hf.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: the checkpoint's")
    for direction in (to_mg, to_hf):
        direction.add_argument("--out", required=True, help="a new or empty directory")
        direction.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (never an input)")
        direction.add_argument("--verify", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import warnings

    from minorsft_megatron.compat import check_megatron_version
    from minorsft_megatron.errors import UserError

    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    try:
        args = parse_args(argv)
        check_megatron_version()
        if args.direction == "hf-to-megatron":
            path = hf_to_megatron(args.hf_dir, args.out, args.spec, args.dtype, overwrite=args.overwrite)
            if args.verify:
                verify(args.hf_dir, path)
        else:
            megatron_to_hf(args.load, args.out, args.dtype, overwrite=args.overwrite)
            if args.verify:
                verify(args.out, args.load)
    except (UserError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
