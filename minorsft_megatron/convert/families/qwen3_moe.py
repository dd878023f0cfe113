"""Qwen3-MoE (Qwen3MoeForCausalLM: Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, routed experts only."""

from minorsft_megatron.convert.family import QwenMoe, moe_matches, register
from minorsft_megatron.convert.families.qwen3 import Qwen3


@register
class Qwen3Moe(QwenMoe, Qwen3):
    architecture, model_type = "Qwen3MoeForCausalLM", "qwen3_moe"

    def matches(self, m) -> bool:
        return moe_matches(m, qk_norm=True, qkv_bias=False, shared=False)
