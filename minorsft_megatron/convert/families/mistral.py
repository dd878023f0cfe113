"""Mistral (MistralForCausalLM): Llama's tensors; sliding-window attention is refused."""

from minorsft_megatron.convert.family import Family, register


@register
class Mistral(Family):
    architecture, model_type = "MistralForCausalLM", "mistral"

    def check(self, hf: dict) -> None:
        super().check(hf)
        self.check_window(hf.get("sliding_window"), hf)  # Mistral's window applies without use_sliding_window

    def matches(self, m) -> bool:
        return False  # a model of no origin is written as Llama (the same tensors)
