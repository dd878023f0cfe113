"""Qwen2 and Qwen2.5 (Qwen2ForCausalLM): biases on q, k and v."""

from minorsft_megatron.convert.family import Family, register


@register
class Qwen2(Family):
    architecture, model_type = "Qwen2ForCausalLM", "qwen2"
    qkv_bias = True
