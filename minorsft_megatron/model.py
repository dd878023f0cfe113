"""GPTModel construction on megatron-core layer specs.

The local spec's norm (`WrappedTorchNorm`) refuses sequence parallelism when Apex is absent. `TorchNorm`
below is the same torch LayerNorm/RMSNorm with its parameters marked `sequence_parallel`, so that
megatron-core's `finalize_model_grads` all-reduces their gradients over the tensor-parallel group, as it does
for Apex's and Transformer Engine's norms. Parameter names are unchanged.
"""

from __future__ import annotations

import math

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from minorsft_megatron import transformer_engine

_TORCH_NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class TorchNorm:
    """torch LayerNorm or RMSNorm (by `config.normalization`) usable under sequence parallelism."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization not in _TORCH_NORMS:
            raise ValueError(
                f"normalization {config.normalization!r} is not supported; use one of {sorted(_TORCH_NORMS)}"
            )
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma is not supported by the torch norm")
        norm = _TORCH_NORMS[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def padded_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 128) -> int:
    """Megatron's padding: the smallest multiple of `divisible_by * tp_size` that holds `vocab_size`."""
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def local_block_spec(config: TransformerConfig, qk_layernorm: bool = False, vp_stage=None):
    """megatron-core's local GPT layer spec with `TorchNorm`, for this pipeline stage's layers."""
    layer = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=config.normalization)
    layer.submodules.input_layernorm = TorchNorm
    layer.submodules.pre_mlp_layernorm = TorchNorm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=TorchNorm)


def block_spec(config: TransformerConfig, spec: str = "local", qk_layernorm: bool = False, vp_stage=None):
    """The transformer block spec named `spec`: "local" (megatron-core modules) or "te" (Transformer Engine)."""
    if spec == "local":
        return local_block_spec(config, qk_layernorm=qk_layernorm, vp_stage=vp_stage)
    if spec == "te":
        return transformer_engine.layer_spec(config, qk_layernorm=qk_layernorm)
    raise ValueError(f"layer spec must be 'local' or 'te', got {spec!r}")


def build_gpt_model(
    config: TransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    pre_process: bool,
    post_process: bool,
    spec: str = "local",
    share_embeddings_and_output_weights: bool = False,
    position_embedding_type: str = "rope",
    rotary_base: int = 10000,
    qk_layernorm: bool = False,
    pg_collection=None,
) -> GPTModel:
    """A GPTModel for this pipeline stage; `vocab_size` is the padded vocabulary (see padded_vocab_size)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, spec, qk_layernorm=qk_layernorm),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        rotary_base=rotary_base,
        pg_collection=pg_collection,
    )
