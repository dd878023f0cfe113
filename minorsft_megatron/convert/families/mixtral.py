"""Mixtral (MixtralForCausalLM: 8x7B, 8x22B): Mistral's attention, every layer routed over
block_sparse_moe.experts.{e}.w1 (gate), w3 (up), w2 (down), top-k weights renormalised."""

from minorsft_megatron.convert.family import ConversionError, Rule, expert_rules, moe_matches, num_experts, register
from minorsft_megatron.convert.families.mistral import Mistral


@register
class Mixtral(Mistral):
    architecture, model_type = "MixtralForCausalLM", "mixtral"

    def check(self, hf: dict) -> None:
        super().check(hf)
        if hf.get("router_jitter_noise"):
            raise ConversionError(f"router_jitter_noise {hf['router_jitter_noise']} cannot be mapped: training here "
                                  "routes without jitter (set it to 0)")

    def model_settings(self, hf: dict) -> dict:
        return dict(super().model_settings(hf), num_experts=num_experts(hf), moe_router_topk=hf["num_experts_per_tok"],
                    moe_ffn_hidden_size=hf["intermediate_size"], moe_norm_topk_prob=True,
                    moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)))

    def moe_mlp_rules(self, m) -> list[Rule]:
        return [Rule("mlp.router.weight", ("block_sparse_moe.gate.weight",))] + \
            expert_rules(m, "block_sparse_moe.experts.{}.", "w1.weight", "w3.weight", "w2.weight")

    def matches(self, m) -> bool:
        return moe_matches(m, qk_norm=False, qkv_bias=False, shared=False) and m.moe_norm_topk_prob and \
            m.moe_layers is None

    def hf_config(self, m) -> dict:
        return dict(super().hf_config(m), intermediate_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
                    num_local_experts=m.num_experts, num_experts_per_tok=m.moe_router_topk,
                    router_aux_loss_coef=m.moe_aux_loss_coeff, sliding_window=None)
