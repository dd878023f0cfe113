"""A LoRA run's adapters on the way out: merged into the Hugging Face weights, or as a Hugging Face PEFT adapter
(`adapter_config.json` + `adapter_model.safetensors`, PEFT's module names) that `peft.PeftModel.from_pretrained`
loads onto the original base.

Adapters are read from the checkpoint as full (TP = 1, EP = 1) tensors, whatever layout trained them: `<part>_a`
[rank, in] and `<part>_b` [out, rank] under the adapted linear's `lora.`, with PEFT's part names (lora.py). Merging
happens in megatron-core's layout (W + alpha / rank * B A for the whole fused linear), before the family's tensor
rules split it into Hugging Face tensors, so it holds for every family and for routed and shared experts alike.

PEFT adapts transformers' fused expert tensors (`mlp.experts.gate_up_proj` [E, 2F, H], `mlp.experts.down_proj`)
through `target_parameters`: one lora_A [E * rank, in] holding expert e's A in rows e*rank..(e+1)*rank, and one
lora_B [out, rank * E] whose column j*E + e is column j of expert e's B; where both tensors are adapted the first
listed is wrapped innermost, so its names run through `base_layer.`."""

from __future__ import annotations

import json
import os

import torch

from minorsft_megatron.lora import Site, config_sites, merged_delta, part_names

EXPERT_TENSORS = {"linear_fc1": "gate_up_proj", "linear_fc2": "down_proj"}
"""transformers' fused expert tensor each routed-expert linear adapts (PEFT's target_parameters)."""


def adapted_sites(m, lora_cfg) -> list[tuple[int, Site]]:
    """(layer from 0, Site) of every adapted linear of a config.ModelConfig, in layer order."""
    return [(layer, site) for layer in range(m.num_layers) for site in config_sites(m, layer)
            if site.selected_by(lora_cfg.target_modules)]


def linear_key(layer: int, site: Site) -> str:
    """The megatron-core state-dict key (at EP = 1) of the linear at `site`, without its parameter name."""
    block = site.block if site.expert is None else f"mlp.experts.local_experts.{site.expert}"
    return f"decoder.layers.{layer}.{block}.{site.target}."


def adapter_key(layer: int, site: Site, part: str, kind: str) -> str:
    return f"{linear_key(layer, site)}lora.{part}_{kind}"


def merging(m, lora_cfg, read):
    """A function (megatron key, full tensor) -> that tensor with its adapters merged in (fp32 sum, its dtype
    kept); `read(key)` gives a full megatron tensor."""
    adapted = {linear_key(layer, site) + "weight": (layer, site) for layer, site in adapted_sites(m, lora_cfg)}
    groups = m.num_query_groups or m.num_attention_heads
    gated = m.activation == "swiglu"

    def merge(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key not in adapted:
            return tensor
        layer, site = adapted[key]
        factors = [(read(adapter_key(layer, site, p, "a")), read(adapter_key(layer, site, p, "b")))
                   for p in part_names(site, gated)]
        return (tensor.float() + merged_delta(site, factors, lora_cfg.alpha / lora_cfg.rank, groups)).to(
            tensor.dtype)

    return merge


def peft_tensors(m, lora_cfg, read, dtype):
    """(PEFT name, tensor) of every adapter, in layer order, and the transformers parameters adapted as
    target_parameters (in nesting order)."""
    sites = adapted_sites(m, lora_cfg)
    fused = [t for t in EXPERT_TENSORS if any(s.block == "mlp.experts" and s.target == t for _, s in sites)]
    tensors = {}
    for layer, site in sites:
        for part in part_names(site, m.activation == "swiglu"):
            a, b = read(adapter_key(layer, site, part, "a")), read(adapter_key(layer, site, part, "b"))
            if site.expert is None:
                module = f"base_model.model.{site.hf_module(layer)}.{part}"
                tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = a.to(dtype), b.to(dtype)
                continue
            depth = len(fused) - 1 - fused.index(site.target)
            module = f"base_model.model.model.layers.{layer}.mlp.experts" + ".base_layer" * depth
            tensors.setdefault(f"{module}.lora_A.weight", []).append(a.to(dtype))
            tensors.setdefault(f"{module}.lora_B.weight", []).append(b.to(dtype))
    for name, value in tensors.items():
        if isinstance(value, list):  # experts in index order: A stacked by rows, B interleaved by columns
            tensors[name] = torch.cat(value) if ".lora_A." in name else torch.stack(value, dim=-1).flatten(1)
    return tensors, [f"mlp.experts.{EXPERT_TENSORS[t]}" for t in fused]


def write_peft_adapter(out: str, m, lora_cfg, read, dtype, base_path: str | None) -> None:
    """adapter_model.safetensors and adapter_config.json of the run's adapters into the directory `out`."""
    from safetensors.torch import save_file

    tensors, parameters = peft_tensors(m, lora_cfg, read, dtype)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    modules = sorted({name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for name in tensors
                      if ".mlp.experts." not in name})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path, "r": lora_cfg.rank,
              "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout, "target_modules": modules,
              "target_parameters": parameters or None, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
              "use_dora": False}
    with open(os.path.join(out, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
