"""Qwen2-MoE (Qwen2MoeForCausalLM: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention, routed experts beside a
shared expert whose output is scaled by sigmoid(shared_expert_gate(x))."""

from minorsft_megatron.convert.family import QwenMoe, Rule, moe_matches, register
from minorsft_megatron.convert.families.qwen2 import Qwen2


@register
class Qwen2Moe(QwenMoe, Qwen2):
    architecture, model_type = "Qwen2MoeForCausalLM", "qwen2_moe"

    def model_settings(self, hf: dict) -> dict:
        shared = hf.get("shared_expert_intermediate_size") or None
        return dict(super().model_settings(hf), moe_shared_expert_ffn_hidden_size=shared,
                    moe_shared_expert_gate=shared is not None)

    def moe_mlp_rules(self, m) -> list[Rule]:
        rules = super().moe_mlp_rules(m)
        if m.moe_shared_expert_ffn_hidden_size:
            rules += [Rule("mlp.shared_experts.linear_fc1.weight",
                           ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"), "cat"),
                      Rule("mlp.shared_experts.linear_fc2.weight", ("mlp.shared_expert.down_proj.weight",)),
                      Rule("mlp.shared_experts.gate_weight", ("mlp.shared_expert_gate.weight",))]
        return rules

    def matches(self, m) -> bool:
        return moe_matches(m, qk_norm=False, qkv_bias=True, shared=True) and m.moe_shared_expert_gate

    def hf_config(self, m) -> dict:
        return dict(super().hf_config(m), shared_expert_intermediate_size=m.moe_shared_expert_ffn_hidden_size,
                    qkv_bias=True)
