"""A LoRA run's adapters on the way out: merged into the Hugging Face weights, or as a Hugging Face PEFT adapter
(`adapter_config.json` + `adapter_model.safetensors`, PEFT's module names) that `peft.PeftModel.from_pretrained`
loads onto the original base.

Adapters are read from the checkpoint as full (TP = 1) tensors, whatever layout trained them: `<part>_a` [rank, in]
and `<part>_b` [out, rank] under `decoder.layers.N.<self_attention|mlp>.<target>.lora.`, with PEFT's part names
(lora.py)."""

from __future__ import annotations

import json
import os
import re

import torch

from minorsft_megatron.lora import HF_MODULES, part_names

_HF_WEIGHT = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight")


def _target_of(part: str, targets) -> str | None:
    for target in targets:
        if part in part_names(target, gated=True) + part_names(target, gated=False):
            return target
    return None


def adapter_key(layer: int, target: str, part: str, kind: str) -> str:
    megatron_module = "self_attention" if HF_MODULES[target] == "self_attn" else "mlp"
    return f"decoder.layers.{layer}.{megatron_module}.{target}.lora.{part}_{kind}"


def merged(name: str, tensor: torch.Tensor, read, lora_cfg) -> torch.Tensor:
    """The Hugging Face tensor `name` with its adapter merged in (W + alpha / rank * B A, in fp32), if it has one;
    `read(key)` gives a full megatron tensor."""
    match = _HF_WEIGHT.fullmatch(name)
    target = match and _target_of(match.group(3), lora_cfg.target_modules)
    if not target:
        return tensor
    layer, part = int(match.group(1)), match.group(3)
    a, b = read(adapter_key(layer, target, part, "a")), read(adapter_key(layer, target, part, "b"))
    delta = (lora_cfg.alpha / lora_cfg.rank) * (b.float() @ a.float())
    return (tensor.float() + delta).to(tensor.dtype)


def peft_tensors(m, lora_cfg, read, dtype):
    """(PEFT name, tensor) of every adapter, in layer order."""
    for layer in range(m.num_layers):
        for target in lora_cfg.target_modules:
            for part in part_names(target, m.activation == "swiglu"):
                module = f"base_model.model.model.layers.{layer}.{HF_MODULES[target]}.{part}"
                for kind, peft_kind in (("a", "lora_A"), ("b", "lora_B")):
                    yield f"{module}.{peft_kind}.weight", read(adapter_key(layer, target, part, kind)).to(dtype)


def write_peft_adapter(out: str, m, lora_cfg, read, dtype, base_path: str | None) -> None:
    """adapter_model.safetensors and adapter_config.json of the run's adapters into the directory `out`."""
    from safetensors.torch import save_file

    tensors = dict(peft_tensors(m, lora_cfg, read, dtype))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    modules = sorted({name.split(".")[-3] for name in tensors})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path, "r": lora_cfg.rank,
              "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout, "target_modules": modules,
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
              "modules_to_save": None, "use_rslora": False, "use_dora": False}
    with open(os.path.join(out, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
