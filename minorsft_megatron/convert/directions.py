"""The two directions, Hugging Face -> megatron-core dist checkpoint and back, and the log-prob check."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from minorsft_megatron.convert.adapters import merging, write_peft_adapter
from minorsft_megatron.convert.family import ConversionError
from minorsft_megatron.convert.io import (
    COPIED_FILES,
    DistCheckpointReader,
    HFReader,
    Staging,
    _Prepared,
    building,
    meta_sharded_state_dict,
    park_entry,
    read_hf_config,
    read_megatron_tensor,
    single_process_group,
    train_config_for,
    write_hf_side_files,
    write_safetensors,
)
from minorsft_megatron.convert.tensors import (
    _index_hf_names,
    _index_megatron_keys,
    family_for_model,
    family_of,
    hf_from_megatron,
    hf_names,
    megatron_from_hf,
    model_config_from_hf,
)
from minorsft_megatron.model import TORCH_DTYPES


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
    family = family_of(hf_config)
    single_process_group()
    sharded = meta_sharded_state_dict(train_cfg, model_cfg.vocab_size)
    staging = Staging(os.path.join(out, ".staging"))
    padded = checkpoint_vocab_size(model_cfg.vocab_size)
    todo = [k for k, v in sharded.items() if getattr(v, "data", None) is not None]
    index = _index_megatron_keys(family, model_cfg)
    try:
        for n, key in enumerate(todo, start=1):
            entry = sharded[key]
            tensor = megatron_from_hf(key, lambda name: reader.get(name).to(TORCH_DTYPES[dtype]), model_cfg, padded,
                                      family, index)
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




LORA_OUTPUTS = ("merged", "peft")


def megatron_to_hf(load: str, out: str, dtype: str | None = None, max_shard_bytes: int = 5 << 30, log=print,
                   overwrite: bool = False, lora: str = "merged") -> str:
    """Convert the checkpoint at `load` (or the latest under it) to a Hugging Face directory `out`. A LoRA run's
    checkpoint (`lora`): `merged`, the full model with the adapters merged in; `peft`, a PEFT adapter for the base
    it started from (adapters.py)."""
    from minorsft_megatron import checkpoint
    from minorsft_megatron.config import TrainConfig, from_dict

    directory = checkpoint.resolve(load)
    state = checkpoint.read_state(directory)
    train_cfg = from_dict(TrainConfig, state["config"], f"{directory} (saved config)")
    train_cfg.model.vocab_size = train_cfg.model.vocab_size or state["vocab_size"]  # unset: the tokenizer's
    if lora not in LORA_OUTPUTS:
        raise ConversionError(f"--lora {lora}: one of {', '.join(LORA_OUTPUTS)}")
    if lora == "peft" and train_cfg.lora.rank == 0:
        raise ConversionError(f"--lora peft: {directory} is not a LoRA run's checkpoint (no adapters)")
    checkpoint.base_of(directory, state)  # an adapters-only checkpoint's base is there, unchanged
    with building(out, "--out", overwrite, {"--load": load, "--load checkpoint": directory}) as tmp:
        write_hf(tmp, directory, state, train_cfg, TORCH_DTYPES[dtype or train_cfg.precision.dtype],
                 max_shard_bytes, log, peft_adapter=lora == "peft")
    log(f"wrote {out}")
    return out


def write_hf(out: str, directory: str, state: dict, train_cfg, out_dtype, max_shard_bytes: int, log,
             peft_adapter: bool = False) -> None:
    """The Hugging Face files of the checkpoint `directory` in `out`, one megatron tensor in memory at a time (a
    LoRA run's: merged, or `peft_adapter` alone)."""
    from minorsft_megatron import checkpoint

    m = train_cfg.model
    single_process_group()
    sharded = meta_sharded_state_dict(train_cfg, state["vocab_size"])
    cache: dict[str, torch.Tensor] = {}

    reader = DistCheckpointReader(directory)
    base = checkpoint.base_of(directory, state)  # a LoRA run's adapters-only checkpoint: the base's tensors
    base_reader = reader if base is None else DistCheckpointReader(base)

    def read_adapter(key):
        return read_megatron_tensor(reader, key, sharded[key])

    merge = merging(m, train_cfg.lora, read_adapter) if train_cfg.lora.rank > 0 else lambda key, tensor: tensor

    def get(local_key):
        if local_key not in cache:
            cache.clear()  # q/k/v and gate/up come one after another: one megatron tensor held at a time
            cache[local_key] = merge(local_key, read_megatron_tensor(base_reader, local_key, sharded[local_key]))
        return cache[local_key]

    os.makedirs(out)
    if peft_adapter:
        write_peft_adapter(out, m, train_cfg.lora, read_adapter, out_dtype, train_cfg.checkpoint.init)
        log(f"wrote the PEFT adapter (rank {train_cfg.lora.rank}) of {directory}")
        return
    meta = lambda key: torch.empty(sharded[key].data.shape, device="meta")  # noqa: E731
    family = family_for_model(m, (state.get("hf") or {}).get("config"))
    names, index = hf_names(m, family), _index_hf_names(family, m)
    shapes = {n: tuple(hf_from_megatron(n, meta, m, family, index).shape) for n in names}

    tensors = ((n, hf_from_megatron(n, get, m, family, index).to(out_dtype).contiguous()) for n in names)
    write_safetensors(out, names, shapes, out_dtype, tensors, max_shard_bytes, log)
    write_hf_side_files(out, state, m, out_dtype)




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
                           initialize=False, adapters=cfg.lora.rank > 0)
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


