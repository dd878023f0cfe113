"""A family's rules applied: Hugging Face config -> ModelConfig, and each tensor from the other side's tensors."""

from __future__ import annotations

import torch

from minorsft_megatron.convert.family import FAMILIES, REFUSED, ConversionError, interleave_qkv, split_qkv
from minorsft_megatron.convert.families import load_all

load_all()
SUPPORTED = {arch: family.model_type for arch, family in FAMILIES.items()}
"""Hugging Face architecture -> model type, for every registered family."""


def family_of(hf: dict):
    """The registered family of a Hugging Face config; ConversionError naming what is supported otherwise."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch in REFUSED:
        raise ConversionError(f"architecture {arch} is not supported: {REFUSED[arch]}")
    if arch not in FAMILIES:
        raise ConversionError(f"architecture {arch} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[arch]


def model_config_from_hf(hf: dict, spec: str = "local"):
    """config.ModelConfig for a Hugging Face config dict; ConversionError for anything not mapped exactly."""
    from minorsft_megatron.config import ModelConfig

    family = family_of(hf)
    family.check(hf)
    return ModelConfig(**family.model_settings(hf), spec=spec)


def family_for_model(m, hf_config: dict | None = None):
    """The family a model is written as: its Hugging Face origin's, else the first that matches its config."""
    if hf_config:
        return family_of(hf_config)
    for family in FAMILIES.values():
        if family.matches(m):
            return family
    raise ConversionError("no Hugging Face family writes this model (supported: " + ", ".join(sorted(FAMILIES)) + ")")


def hf_config_from_model(m) -> dict:
    """A Hugging Face config for a model that did not come from one (a random init_checkpoint, say)."""
    return family_for_model(m).hf_config(m)


# ---- rules by name ------------------------------------------------------------------------------------------------

def _layer_key(local_key: str) -> tuple[int | None, str]:
    parts = local_key.split(".")
    if parts[:2] == ["decoder", "layers"]:
        return int(parts[2]), ".".join(parts[3:])
    return None, local_key


def _all_rules(family, m):
    """(layer or None, rule) for every tensor, in Hugging Face writing order."""
    before, after = family.top_rules(m)
    yield from ((None, r) for r in before)
    for layer in range(m.num_layers):
        yield from ((layer, r) for r in family.layer_rules(m, layer))
    yield from ((None, r) for r in after)


def _hf_name(layer, name):
    return name if layer is None else f"model.layers.{layer}.{name}"


def hf_names(m, family=None) -> list[str]:
    """Hugging Face tensor names of this model, in writing order."""
    family = family or family_for_model(m)
    return [_hf_name(layer, name) for layer, rule in _all_rules(family, m) for name in rule.hf]


def _index_megatron_keys(family, m) -> dict:
    """{megatron key at TP = PP = EP = 1: (layer or None, rule)} of every tensor."""
    return {rule.megatron if layer is None else f"decoder.layers.{layer}.{rule.megatron}": (layer, rule)
            for layer, rule in _all_rules(family, m)}


def megatron_from_hf(local_key: str, get, m, padded_vocab: int, family=None,
                     index: dict | None = None) -> torch.Tensor:
    """The megatron tensor `local_key` (a key of GPTModel.state_dict() at TP = PP = EP = 1) from HF tensors
    `get(name)`. `index`: the family's keys (from _index_megatron_keys), to look up many keys without rebuilding
    it."""
    index = index if index is not None else _index_megatron_keys(family or family_for_model(m), m)
    if local_key not in index:
        raise ConversionError(f"no Hugging Face source for megatron tensor {local_key}")
    layer, rule = index[local_key]
    parts = [get(_hf_name(layer, name)) for name in rule.hf]
    if rule.kind == "copy":
        return parts[0]
    if rule.kind == "vocab":
        t = parts[0]
        return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])
    if rule.kind == "cat":
        return torch.cat(parts)
    return interleave_qkv(*parts, m)


def _index_hf_names(family, m) -> dict:
    return {_hf_name(layer, name): (layer, rule, i) for layer, rule in _all_rules(family, m)
            for i, name in enumerate(rule.hf)}


def hf_from_megatron(hf_name: str, get, m, family=None, index: dict | None = None) -> torch.Tensor:
    """The HF tensor `hf_name` from megatron tensors `get(local_key)` (TP = PP = EP = 1 keys). `index`: the
    family's names (from _index_hf_names), to look up many names without rebuilding it."""
    family = family or family_for_model(m)
    index = index if index is not None else _index_hf_names(family, m)
    if hf_name not in index:
        raise ConversionError(f"no megatron source for Hugging Face tensor {hf_name}")
    layer, rule, i = index[hf_name]
    tensor = get(rule.megatron if layer is None else f"decoder.layers.{layer}.{rule.megatron}")
    if rule.kind == "copy":
        return tensor
    if rule.kind == "vocab":
        return tensor[: m.vocab_size]
    if rule.kind == "cat":
        return tensor.chunk(len(rule.hf))[i]
    return split_qkv(tensor, m)[i]
