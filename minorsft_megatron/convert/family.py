"""What a model family is to the converter: its Hugging Face config read into a ModelConfig (and written back),
and its tensors as rules between Hugging Face names and megatron-core's (TP = PP = EP = 1) state-dict keys.

A family module (convert/families/NAME.py) defines one `Family` subclass decorated with `@register`; everything
else (reading, staging, writing, layouts) is shared. A rule maps one megatron tensor to the Hugging Face tensors it
is made of: `copy` (one to one), `cat` (rows of several, e.g. SwiGLU's gate and up), `qkv` (megatron's per
query group interleaving of q, k and v).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minorsft_megatron.errors import UserError

MEGATRON_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
FAMILIES: dict[str, "Family"] = {}
"""Hugging Face architecture -> its family, filled by @register."""
REFUSED = {
    "DeepseekV3ForCausalLM": "multi-head latent attention and the sigmoid router's expert bias are not built here",
    "DeepseekV2ForCausalLM": "multi-head latent attention is not built here",
    "GptOssForCausalLM": "attention sinks and its clamped SwiGLU experts are not built here",
}
"""Architectures refused by name, with why."""


class ConversionError(UserError):
    """A checkpoint or config the converter cannot map exactly; one line."""


def register(cls):
    """Class decorator: add a Family subclass to FAMILIES under its architecture."""
    FAMILIES[cls.architecture] = cls()
    return cls


@dataclass(frozen=True)
class Rule:
    """One megatron tensor (`megatron`, a key under decoder.layers.{i}. or a top-level key) and the Hugging Face
    tensors (`hf`, names under model.layers.{i}. or top-level) it is made of, joined as `kind` says."""

    megatron: str
    hf: tuple[str, ...]
    kind: str = "copy"
    """copy, cat (rows), qkv (per-query-group interleaving), vocab (rows padded to the checkpoint's vocabulary)."""


# ---- q/k/v -------------------------------------------------------------------------------------------------------

def _head_layout(m):
    d = m.kv_channels or m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    return d, groups, m.num_attention_heads // groups


def interleave_qkv(q, k, v, m):
    """[q; k; v] rows -> megatron's per-query-group [q_g; k_g; v_g] layout (weights or biases)."""
    d, groups, per_group = _head_layout(m)
    rest = q.shape[1:]
    q = q.reshape(groups, per_group * d, *rest)
    return torch.cat([q, k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)], dim=1).reshape(-1, *rest)


def split_qkv(qkv, m):
    d, groups, per_group = _head_layout(m)
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * d, *rest)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


# ---- rope ----------------------------------------------------------------------------------------------------------

def rope(hf: dict) -> tuple[float, float | None]:
    """(rope theta, Llama 3.1 scaling factor or None), from transformers 4 (rope_theta/rope_scaling) or 5
    (rope_parameters) configs; any other scaling is refused."""
    params = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return float(theta), None
    if kind != "llama3":
        raise ConversionError(f"rope scaling type {kind!r} cannot be mapped exactly (supported: llama3)")
    for key, value in MEGATRON_ROPE.items():
        if float(scaling.get(key, value)) != value:
            raise ConversionError(f"llama3 rope scaling with {key}={scaling.get(key)} cannot be mapped exactly "
                                  f"(megatron-core fixes it at {value})")
    return float(theta), float(scaling["factor"])


# ---- the base family: a dense decoder ----------------------------------------------------------------------------

class Family:
    """A dense Llama-style decoder; subclasses change what differs (biases, norms, MoE layers, config keys)."""

    architecture = ""
    model_type = ""
    qkv_bias = False
    """Biases on q, k and v (Qwen2)."""
    qk_norm = False
    """Per-head RMSNorm of queries and keys (Qwen3)."""

    # -- config --

    def check(self, hf: dict) -> None:
        """Refuse what this family's config holds that cannot be mapped exactly."""
        if hf.get("hidden_act", "silu") != "silu":
            raise ConversionError(f"hidden_act {hf['hidden_act']!r} cannot be mapped (supported: silu)")
        if hf.get("mlp_bias"):
            raise ConversionError("mlp_bias: true cannot be mapped (no MLP biases in these models)")
        if not self.qkv_bias and hf.get("attention_bias"):
            raise ConversionError("attention_bias: true (biases on q, k, v and o) cannot be mapped; only Qwen2's "
                                  "q/k/v biases are supported")
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        self.check_window(window, hf)

    @staticmethod
    def check_window(window, hf: dict) -> None:
        if window is not None and window < hf["max_position_embeddings"]:
            raise ConversionError(f"sliding_window {window} < max_position_embeddings "
                                  f"{hf['max_position_embeddings']}: sliding-window attention is not supported")

    def model_settings(self, hf: dict) -> dict:
        """config.ModelConfig keyword arguments for `hf` (checked)."""
        theta, scaling = rope(hf)
        heads = hf["num_attention_heads"]
        return dict(
            num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads, vocab_size=hf["vocab_size"],
            max_position_embeddings=hf["max_position_embeddings"], rotary_base=theta, rope_scaling_factor=scaling,
            normalization="RMSNorm", norm_epsilon=hf.get("rms_norm_eps", 1e-6), activation="swiglu",
            add_qkv_bias=self.qkv_bias, qk_layernorm=self.qk_norm,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )

    def matches(self, m) -> bool:
        """Whether a model with no Hugging Face origin (model config `m`) is written as this family."""
        return m.num_experts is None and m.add_qkv_bias == self.qkv_bias and m.qk_layernorm == self.qk_norm

    def hf_config(self, m) -> dict:
        """A Hugging Face config for a model that did not come from one (a random init_checkpoint, say)."""
        config = {
            "architectures": [self.architecture], "model_type": self.model_type,
            "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
            "head_dim": m.kv_channels or m.hidden_size // m.num_attention_heads, "vocab_size": m.vocab_size,
            "max_position_embeddings": m.max_position_embeddings, "rms_norm_eps": m.norm_epsilon,
            "rope_theta": m.rotary_base, "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu",
        }
        if m.rope_scaling_factor is not None:
            config["rope_scaling"] = dict(MEGATRON_ROPE, rope_type="llama3", factor=m.rope_scaling_factor)
        return config

    # -- tensors --

    def top_rules(self, m) -> tuple[list[Rule], list[Rule]]:
        """Rules outside the layers: (before the layers, after them), in writing order."""
        after = [Rule("decoder.final_layernorm.weight", ("model.norm.weight",))]
        if not m.tie_embeddings:
            after.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab"))
        return [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")], after

    def attention_rules(self, m) -> list[Rule]:
        rules = [Rule("input_layernorm.weight", ("input_layernorm.weight",)),
                 Rule("self_attention.linear_qkv.weight", tuple(f"self_attn.{x}_proj.weight" for x in "qkv"), "qkv")]
        if self.qkv_bias:
            rules.append(Rule("self_attention.linear_qkv.bias", tuple(f"self_attn.{x}_proj.bias" for x in "qkv"),
                              "qkv"))
        if self.qk_norm:
            rules += [Rule("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",)),
                      Rule("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",))]
        return rules + [Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
                        Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",))]

    def dense_mlp_rules(self, m) -> list[Rule]:
        return [Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "cat"),
                Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",))]

    def moe_mlp_rules(self, m) -> list[Rule]:
        raise ConversionError(f"{self.architecture} has no mixture-of-experts layers")

    def layer_rules(self, m, layer: int) -> list[Rule]:
        """The rules of layer `layer`, in writing order."""
        moe = m.num_experts is not None and (m.moe_layers is None or m.moe_layers[layer])
        return self.attention_rules(m) + (self.moe_mlp_rules(m) if moe else self.dense_mlp_rules(m))


def expert_rules(m, hf_expert: str, gate: str, up: str, down: str) -> list[Rule]:
    """The routed experts' rules: megatron's SequentialMLP experts from Hugging Face's per-expert tensors
    (`hf_expert` formatted with the expert index, e.g. "mlp.experts.{}.")."""
    rules = []
    for e in range(m.num_experts):
        p, mg = hf_expert.format(e), f"mlp.experts.local_experts.{e}."
        rules += [Rule(mg + "linear_fc1.weight", (p + gate, p + up), "cat"), Rule(mg + "linear_fc2.weight", (p + down,))]
    return rules


class QwenMoe(Family):
    """The Qwen mixture-of-experts layout (Qwen2-MoE, Qwen3-MoE): mlp.gate is the router, mlp.experts.{e} the
    experts; a layer is MoE unless listed in mlp_only_layers or off the decoder_sparse_step."""

    def check(self, hf: dict) -> None:
        super().check(hf)
        if not num_experts(hf):
            raise ConversionError(f"{self.architecture} with no experts (num_experts 0) is not supported")

    def model_settings(self, hf: dict) -> dict:
        step, dense = hf.get("decoder_sparse_step", 1) or 1, set(hf.get("mlp_only_layers") or ())
        layers = [int(i not in dense and (i + 1) % step == 0) for i in range(hf["num_hidden_layers"])]
        return dict(super().model_settings(hf), num_experts=num_experts(hf), moe_router_topk=hf["num_experts_per_tok"],
                    moe_ffn_hidden_size=hf["moe_intermediate_size"], moe_norm_topk_prob=bool(hf.get("norm_topk_prob")),
                    moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)),
                    moe_layers=None if all(layers) else layers)

    def moe_mlp_rules(self, m) -> list[Rule]:
        return [Rule("mlp.router.weight", ("mlp.gate.weight",))] + \
            expert_rules(m, "mlp.experts.{}.", "gate_proj.weight", "up_proj.weight", "down_proj.weight")

    def hf_config(self, m) -> dict:
        dense = [] if m.moe_layers is None else [i for i, moe in enumerate(m.moe_layers) if not moe]
        return dict(super().hf_config(m), num_experts=m.num_experts, num_experts_per_tok=m.moe_router_topk,
                    moe_intermediate_size=m.moe_ffn_hidden_size or m.ffn_hidden_size, norm_topk_prob=m.moe_norm_topk_prob,
                    decoder_sparse_step=1, mlp_only_layers=dense, router_aux_loss_coef=m.moe_aux_loss_coeff)


def num_experts(hf: dict) -> int:
    """Routed experts of a Hugging Face config (num_experts on the Hub, num_local_experts in transformers 5)."""
    return int(hf.get("num_experts", hf.get("num_local_experts")) or 0)


def moe_matches(m, qk_norm: bool, qkv_bias: bool, shared: bool) -> bool:
    return m.num_experts is not None and m.qk_layernorm == qk_norm and m.add_qkv_bias == qkv_bias and \
        bool(m.moe_shared_expert_ffn_hidden_size) == shared and m.moe_router_score_function == "softmax"
