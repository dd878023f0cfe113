"""Llama 2, 3 and 3.1 (LlamaForCausalLM): the base dense family."""

from minorsft_megatron.convert.family import Family, register


@register
class Llama(Family):
    architecture, model_type = "LlamaForCausalLM", "llama"
