"""GPTModel construction on megatron-core layer specs, from the training config or from explicit settings.

The local spec's norm (`WrappedTorchNorm`) refuses sequence parallelism when Apex is absent. `TorchNorm`
below is the same torch LayerNorm/RMSNorm with its parameters marked `sequence_parallel`, so that
megatron-core's `finalize_model_grads` all-reduces their gradients over the tensor-parallel group, as it does
for Apex's and Transformer Engine's norms. Parameter names are unchanged.
"""

from __future__ import annotations

import math
import types
from dataclasses import replace

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

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


def local_layer_spec(config: TransformerConfig, qk_layernorm: bool = False, moe: bool = False):
    """megatron-core's local GPT layer spec with `TorchNorm`; `moe`: its MoELayer (router, SequentialMLP experts,
    shared expert) instead of the dense MLP. An MoE layer's pre-MLP norm keeps its own checkpoint key, as on the
    Transformer Engine spec (where no fused layer-norm + fc1 exists for it to be named after)."""
    layer = get_gpt_layer_local_spec(num_experts=config.num_moe_experts if moe else None, moe_grouped_gemm=False,
                                     qk_layernorm=qk_layernorm, normalization=config.normalization)
    layer.submodules.input_layernorm = TorchNorm
    layer.submodules.pre_mlp_layernorm = TorchNorm
    if moe:
        layer.submodules.sharded_state_dict_keys_map = {
            k: v for k, v in layer.submodules.sharded_state_dict_keys_map.items() if k != "pre_mlp_layernorm."}
    if qk_layernorm:  # Qwen3's per-head norms: usable under sequence parallelism too
        layer.submodules.self_attention.submodules.q_layernorm = TorchNorm
        layer.submodules.self_attention.submodules.k_layernorm = TorchNorm
    return layer


def moe_layer_pattern(config: TransformerConfig) -> list[bool]:
    """Per global layer, whether it is an MoE layer (megatron-core's moe_layer_freq: a 0/1 list or every N-th)."""
    if config.num_moe_experts is None:
        return [False] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(config.num_layers)]
    return [bool(x) for x in freq]


def local_block_spec(config: TransformerConfig, qk_layernorm: bool = False, vp_stage=None):
    """megatron-core's local GPT layer specs with `TorchNorm`, for this pipeline stage's layers."""
    specs = {moe: local_layer_spec(config, qk_layernorm, moe) for moe in set(moe_layer_pattern(config))}
    offset = get_transformer_layer_offset(config, vp_stage)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    pattern = moe_layer_pattern(config)[offset:offset + num_layers]
    return TransformerBlockSubmodules(layer_specs=[specs[moe] for moe in pattern], layer_norm=TorchNorm)


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
    rope_scaling_factor: float | None = None,
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
        rope_scaling=rope_scaling_factor is not None,
        rope_scaling_factor=rope_scaling_factor or 8.0,
        pg_collection=pg_collection,
    )


# ---- from the training config -------------------------------------------------------------------------------

VOCAB_MULTIPLE = 1024
"""The embedding is padded to a multiple of this, whatever the TP size, so checkpoints load under any TP <= 8."""
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def checkpoint_vocab_size(vocab_size: int) -> int:
    """Rows of the (TP-independent) padded embedding for a tokenizer of `vocab_size` entries."""
    return padded_vocab_size(vocab_size, 1, divisible_by=VOCAB_MULTIPLE)


WEIGHTS = {
    # random weights that must not depend on the layout: drawn in full on the CPU from the seed, then split
    "random": dict(use_cpu_initialization=True, perform_initialization=True),
    # weights a checkpoint will replace: built on the device and initialised there (cheap); megatron-core marks
    # tensor-parallel weights (`tensor_model_parallel`, read by the gradient norm) only when it initialises them
    "loaded": dict(use_cpu_initialization=False, perform_initialization=True),
    # no memory at all (under torch.device("meta")): the checkpoint keys and shapes only
    "meta": dict(use_cpu_initialization=True, perform_initialization=False),
}


def transformer_config(model_cfg, parallel_cfg, precision: transformer_engine.RolePrecision,
                       weights: str = "random") -> TransformerConfig:
    """megatron-core's TransformerConfig for `model_cfg` (config.ModelConfig) at this parallel layout, no dropout,
    in `precision` (its FP8 settings go to megatron-core's FP8 support: Transformer Engine spec, GPU), with its
    weights made as `weights` says (WEIGHTS)."""
    dtype = precision.dtype
    torch_dtype = TORCH_DTYPES[dtype]
    swiglu = model_cfg.activation == "swiglu"
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.kv_channels,
        normalization=model_cfg.normalization,
        layernorm_epsilon=model_cfg.norm_epsilon,
        gated_linear_unit=swiglu,
        activation_func=torch.nn.functional.silu if swiglu else torch.nn.functional.gelu,
        add_bias_linear=False,
        add_qkv_bias=model_cfg.add_qkv_bias,
        qk_layernorm=model_cfg.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model_cfg.init_method_std,
        tensor_model_parallel_size=parallel_cfg.tp,
        pipeline_model_parallel_size=parallel_cfg.pp,
        context_parallel_size=parallel_cfg.cp,
        sequence_parallel=parallel_cfg.sp,
        params_dtype=torch_dtype,
        pipeline_dtype=torch_dtype,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        fp8=precision.fp8,
        fp8_recipe=precision.fp8_recipe,
        fp8_param=precision.fp8_param,
        **WEIGHTS[weights],
        **moe_settings(model_cfg, parallel_cfg),
        calculate_per_token_loss=True,
    )


def moe_settings(model_cfg, parallel_cfg) -> dict:
    """megatron-core's MoE settings for `model_cfg` (none for a dense model): dropless unless a capacity factor is
    set, no input jitter, SequentialMLP experts (the local spec), EP/ETP from `parallel_cfg`."""
    m, p = model_cfg, parallel_cfg
    if m.num_experts is None:
        return {}
    return dict(
        num_moe_experts=m.num_experts,
        moe_layer_freq=list(m.moe_layers) if m.moe_layers is not None else 1,
        moe_router_topk=m.moe_router_topk,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=m.moe_shared_expert_gate,
        moe_router_score_function=m.moe_router_score_function,
        moe_router_pre_softmax=not m.moe_norm_topk_prob,  # softmax over all experts, then top-k: no renormalising
        moe_router_load_balancing_type=m.moe_load_balancing,
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_z_loss_coeff=m.moe_z_loss_coeff or None,
        moe_router_dtype="fp32" if m.moe_router_fp32 else None,
        moe_expert_capacity_factor=m.moe_capacity_factor,
        moe_token_dispatcher_type=p.moe_dispatcher,
        moe_grouped_gemm=False,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp or p.tp,
    )


def gpt_from_config(model_cfg, config: TransformerConfig, padded_vocab: int, pre_process: bool,
                    post_process: bool) -> GPTModel:
    """This pipeline stage's GPTModel for `model_cfg` (config.ModelConfig)."""
    return build_gpt_model(
        config,
        vocab_size=padded_vocab,
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        spec=model_cfg.spec,
        share_embeddings_and_output_weights=model_cfg.tie_embeddings,
        rotary_base=model_cfg.rotary_base,
        qk_layernorm=model_cfg.qk_layernorm,
        rope_scaling_factor=model_cfg.rope_scaling_factor,
    )


def build_model(cfg, precision: transformer_engine.RolePrecision, vocab: int, device, initialize: bool,
                adapters: bool = False):
    """This pipeline stage's GPTModel for `cfg` (config.TrainConfig) in `precision` (wrapped in Float16Module for
    bf16/fp16) on `device`, on the layer spec `cfg.model.spec` resolves to here (auto: Transformer Engine on a GPU
    where it imports). `initialize`: draw random weights from `cfg.seed`, else leave them to a checkpoint.
    `adapters`: with cfg.lora's adapters (lora.py), every other weight frozen."""
    from megatron.core import parallel_state
    from megatron.core.transformer.module import Float16Module

    model_cfg = replace(cfg.model, spec=transformer_engine.resolve_spec(cfg.model.spec, device.type))
    config = transformer_config(model_cfg, cfg.parallel, precision, "random" if initialize else "loaded")
    torch.manual_seed(cfg.seed)  # the full weights are drawn on the CPU from this seed, then split over TP
    model = gpt_from_config(model_cfg, config, checkpoint_vocab_size(vocab),
                            parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage())
    mark_expert_parameters(model)
    if adapters:
        from minorsft_megatron import lora

        lora.add_adapters(model, cfg.lora, config, cfg.seed)
    if precision.dtype != "fp32":
        model = Float16Module(config, model)
    return model.to(device), config


def mark_expert_parameters(model) -> None:
    """Make every routed expert's weights expert-parallel parameters (`allreduce = False`) at EP = 1 too.

    megatron-core marks them so only under EP > 1 (`is_expert and expert_parallel` in its parallel linears); at
    EP = 1 DDP and the optimizer then treat them as dense weights, reduced over the dense data-parallel group.
    With ETP != TP that is wrong: an expert not split over TP is replicated over the TP ranks, each of which routes
    its own sequence-parallel tokens, and its gradient must be summed over the expert-data-parallel group (which
    holds those ranks), not the dense one. Marked always, the experts are reduced over their expert-data-parallel
    group (at EP = 1 and ETP = TP the same ranks as the dense group) and keep their own optimizer at every EP, so
    the distributed optimizer's checkpoint has one structure (a dense and an expert optimizer) whatever the EP."""
    for module in model.modules():
        if getattr(module, "is_expert", False):
            for param in module.parameters(recurse=False):
                param.allreduce = False


def unwrap(model):
    """The GPTModel inside DistributedDataParallel and Float16Module wrappers (or the model itself)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def forward_kwargs(model) -> dict:
    """Keyword arguments for calling `model`: a Float16Module keeps the last stage's output in bf16/fp16 (the
    log-prob code upcasts what it needs, chunk by chunk; a full-vocabulary fp32 copy would be waste)."""
    from megatron.core.transformer.module import Float16Module

    while True:
        if isinstance(model, Float16Module):
            return {"fp32_output": False}
        if not hasattr(model, "module"):
            return {}
        model = model.module


def _hidden_states_forward(self, input_, weight=None, runtime_gather_output=None):
    return input_, None


def output_log_probs(model, chunk_size: int, vocab_size: int, tp_group, sequence_parallel: bool):
    """How this stage's `model` output becomes label log-probs (logprobs.OutputLogProbs).

    With `chunk_size` > 0 the model is made to return its final hidden states (after the final norm) instead of
    logits: its output layer's forward answers its input, and the log-probs are computed chunk by chunk from the
    output layer's weight (the tied embedding's when shared), so no full-vocabulary logits tensor exists.
    megatron-core 0.16's GPTModel has no hook between the final norm and the output layer (0.18 added
    `output_processor`); this works alike on every supported version and keeps the parameters and checkpoint keys.
    """
    from minorsft_megatron.logprobs import OutputLogProbs

    if chunk_size == 0:
        return OutputLogProbs(vocab_size, tp_group)
    gpt = unwrap(model)
    if gpt.post_process:
        gpt.output_layer.forward = types.MethodType(_hidden_states_forward, gpt.output_layer)
    weight = gpt.shared_embedding_or_output_weight if gpt.share_embeddings_and_output_weights else \
        (lambda: gpt.output_layer.weight)
    return OutputLogProbs(vocab_size, tp_group, chunk_size, weight, sequence_parallel)
