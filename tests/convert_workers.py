"""Helpers for the conversion tests: tiny random Hugging Face models, and Megatron per-token log-probs."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "llama31", "qwen2", "qwen3", "mistral")
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral")
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


def hf_config(family: str):
    from transformers import (LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config,
                              Qwen3MoeConfig)

    return {
        # 4 experts, the first layer dense (mlp_only_layers), top-k renormalised
        "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, **MOE, num_experts=4, head_dim=24, norm_topk_prob=True,
                                            mlp_only_layers=[0]),
        # 8 experts beside a gated shared expert, top-k not renormalised
        "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, **MOE, num_experts=8, shared_expert_intermediate_size=48,
                                            norm_topk_prob=False),
        "mixtral": lambda: MixtralConfig(**dict(COMMON, intermediate_size=32), num_local_experts=4,
                                         num_experts_per_tok=2, sliding_window=None),
        "llama": lambda: LlamaConfig(**COMMON),
        "llama31": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}),
        "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True),
        "qwen3": lambda: Qwen3Config(**COMMON, head_dim=24),  # head_dim != hidden / heads
        "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    }[family]()


def make_hf_model(family: str, path: str, vocab_size: int | None = None) -> str:
    """A tiny random model of `family` saved with save_pretrained (fp32 safetensors)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = hf_config(family)
    config.vocab_size = vocab_size or config.vocab_size
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # weights big enough that every path matters, norms away from 1
        for name, param in model.named_parameters():
            param.normal_(0, 0.2) if param.dim() > 1 else param.uniform_(0.5, 1.5)
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(path)
    return path


def hf_token_log_probs(path: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits.float()
    return logits.log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0].double()


def megatron_token_log_probs(ckpt: str, layouts, tokens: torch.Tensor, save_tp2_to: str | None = None) -> dict:
    """Per-token log-probs `[b, s]` of the checkpoint at each (tp, pp), (tp, pp, ep, etp) or (tp, pp, ep, etp,
    MoE dispatcher) layout, through
    megatron-core's schedule (on the last pipeline stage; other ranks return nothing). Optionally re-saves it from
    the TP = 2 layout (`save_tp2_to` a path), or from each layout a dict {layout: path} names."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from minorsft_megatron import checkpoint, parallel
    from minorsft_megatron.config import ParallelConfig, TrainConfig, from_dict
    from minorsft_megatron.device import setup_device
    from minorsft_megatron.logprobs import vocab_parallel_log_probs
    from minorsft_megatron.model import build_model
    from minorsft_megatron.transformer_engine import RolePrecision

    device = setup_device("cpu")
    state = checkpoint.read_state(ckpt)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    b, s = inputs.shape
    out = {}
    for layout in layouts:
        tp, pp, ep, etp, dispatcher = (*layout, 1, None, "alltoall")[:5] if len(layout) == 2 else \
            (*layout, "alltoall")[:5]
        pgs = parallel.initialize(device, tp=tp, pp=pp, ep=ep, etp=etp)
        cfg = from_dict(TrainConfig, state["config"], ckpt)
        cfg.parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp, sp=tp > 1 and ep * (etp or tp) > 1,
                                      moe_dispatcher=dispatcher)
        model, _ = build_model(cfg, RolePrecision("fp32"), state["vocab_size"], device, initialize=False)
        checkpoint.load(ckpt, model)
        model.eval()

        def forward_step(data_iterator, model):
            next(data_iterator)
            logits = model(inputs, torch.arange(s).repeat(b, 1), attention_mask=None)

            def loss_func(output):
                logp = vocab_parallel_log_probs(output, labels, state["vocab_size"], pgs.tp)
                return logp.sum(), torch.tensor(1, dtype=torch.int), {"logp": logp.detach()}

            return logits, loss_func

        with torch.no_grad():
            result = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
                seq_length=s, micro_batch_size=b, forward_only=True,
            )
        if parallel_state.is_pipeline_last_stage():
            out[layout] = result[0]["logp"].double()
        if (layout in save_tp2_to) if isinstance(save_tp2_to, dict) else (save_tp2_to and layout == (2, 1)):
            path = save_tp2_to[layout] if isinstance(save_tp2_to, dict) else save_tp2_to
            checkpoint.save(path, 0, model, None, state)
        torch.distributed.barrier()
        parallel_state.destroy_model_parallel()
        torch.distributed.barrier()
    return out
