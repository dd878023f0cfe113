"""Qwen3 (Qwen3ForCausalLM): per-head RMSNorm of queries and keys, a head size of its own."""

from minorsft_megatron.convert.family import Family, register


@register
class Qwen3(Family):
    architecture, model_type = "Qwen3ForCausalLM", "qwen3"
    qk_norm = True
