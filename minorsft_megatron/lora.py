"""LoRA adapters on megatron-core's parallel linears, laid out as the base is.

An adapter adds  scale * B (A x)  (scale = alpha / rank) to a base linear's output, with A [rank, in] and
B [out, rank]. The adapters follow PEFT's module split, so that they export to a Hugging Face PEFT adapter one to
one: the fused `linear_qkv` holds three (q_proj, k_proj, v_proj), a gated `linear_fc1` two (gate_proj, up_proj),
`linear_proj` (o_proj) and `linear_fc2` (down_proj) one each. They are children (`lora`) of the base linear, whose
own parameters keep their names, and a forward hook adds their output.

Layout (TP group size t):
- column-parallel base (output split over TP): A replicated, B split as the base's output rows. h = A x is one
  [.., parts x rank] tensor for all the linear's adapters; without sequence parallelism its gradient is all-reduced
  over TP (`copy_to_tensor_model_parallel_region`: each rank's B covers its output rows only); with it, h is
  gathered over the sequence (`gather_from_sequence_parallel_region`, backward reduce-scatter) and A's gradient,
  partial over the sequence shards, is all-reduced over TP by finalize_model_grads (A is marked
  `sequence_parallel`, as the norms are).
- row-parallel base (input split over TP): A split as the base's input columns, B replicated. h = A x is partial
  over TP and summed as the base's output is (`reduce_from_tensor_model_parallel_region`, or under sequence
  parallelism `reduce_scatter_to_sequence_parallel_region`, B then marked `sequence_parallel`).
Each adapter set costs one collective of `parts x rank` features beside the base's own (of `out` features).

`adapters_disabled(model)` switches every adapter off: the model is then the base exactly (reference.mode: base).
"""

from __future__ import annotations

import contextlib
import math
import types
import zlib

import torch

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
"""The megatron-core linears of a dense transformer layer that can hold adapters."""
COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")
HF_MODULES = {"linear_qkv": "self_attn", "linear_proj": "self_attn", "linear_fc1": "mlp", "linear_fc2": "mlp"}
"""The Hugging Face submodule (of model.layers.N) each target's adapters belong to."""


def part_names(target: str, gated: bool) -> tuple[str, ...]:
    """PEFT's names of the adapters a target holds."""
    return {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
            "linear_fc1": ("gate_proj", "up_proj") if gated else ("up_proj",),
            "linear_fc2": ("down_proj",)}[target]


def full_shapes(target: str, config) -> dict[str, tuple[int, int]]:
    """{part: (out, in)} of the full (TP = 1) adapters of `target` for a megatron-core TransformerConfig."""
    d = config.kv_channels
    heads, groups, hidden, ffn = config.num_attention_heads, config.num_query_groups, config.hidden_size, \
        config.ffn_hidden_size
    gated = config.gated_linear_unit
    return {"linear_qkv": {"q_proj": (heads * d, hidden), "k_proj": (groups * d, hidden),
                           "v_proj": (groups * d, hidden)},
            "linear_proj": {"o_proj": (hidden, heads * d)},
            "linear_fc1": dict.fromkeys(part_names("linear_fc1", gated), (ffn, hidden)),
            "linear_fc2": {"down_proj": (hidden, ffn)}}[target]


class AdapterSet(torch.nn.Module):
    """The adapters of one base linear on this TP rank: parameters `<part>_a` and `<part>_b`."""

    def __init__(self, target: str, config, rank: int, alpha: float, tp_group, full_a: dict[str, torch.Tensor]):
        """`full_a`: {part: [rank, in] full A} (the same on every rank); B starts at zero."""
        super().__init__()
        self.target, self.rank, self.scale = target, rank, alpha / rank
        self.column = target in COLUMN_PARALLEL
        self.tp_group, self.sp = tp_group, config.sequence_parallel
        self.groups_local = config.num_query_groups // tp_group.size()
        self.enabled = True
        t, r = tp_group.size(), tp_group.rank()
        self.parts = tuple(full_a)
        for part, (out, _) in full_shapes(target, config).items():
            a = full_a[part] if self.column else full_a[part].chunk(t, dim=1)[r]
            b = torch.zeros(out // t if self.column else out, rank, dtype=a.dtype)
            self.register_parameter(f"{part}_a", torch.nn.Parameter(a.contiguous()))
            self.register_parameter(f"{part}_b", torch.nn.Parameter(b))
        self._mark_parameters()

    def _mark_parameters(self) -> None:
        """Split parameters are tensor-parallel (the gradient norm counts them on every rank); replicated ones whose
        gradients are partial over the sequence shards are `sequence_parallel` (all-reduced over TP)."""
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        for part in self.parts:
            split, replicated = (getattr(self, f"{part}_b"), getattr(self, f"{part}_a")) if self.column else \
                (getattr(self, f"{part}_a"), getattr(self, f"{part}_b"))
            if self.tp_group.size() > 1:
                set_tensor_model_parallel_attributes(split, True, 0 if self.column else 1, 1)
            replicated.sequence_parallel = self.sp

    def tp_axes(self) -> dict[str, int]:
        """{parameter name: TP-split axis} for the dist checkpoint (replicated ones absent)."""
        return {f"{p}_b" if self.column else f"{p}_a": 0 if self.column else 1 for p in self.parts}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the base linear's input; returns scale * B A x in the base's output layout on this rank."""
        from megatron.core import tensor_parallel as tp

        a = torch.cat([getattr(self, f"{p}_a") for p in self.parts])  # [parts * r, in(/t)]
        h = torch.matmul(x, a.t().to(x.dtype))  # [s(/t), b, parts * r]
        if self.column:
            h = tp.gather_from_sequence_parallel_region(h, True, self.tp_group) if self.sp else \
                tp.copy_to_tensor_model_parallel_region(h, self.tp_group)
        else:
            h = tp.reduce_scatter_to_sequence_parallel_region(h, self.tp_group) if self.sp else \
                tp.reduce_from_tensor_model_parallel_region(h, self.tp_group)
        outs = [torch.matmul(hp, getattr(self, f"{p}_b").t().to(x.dtype))
                for p, hp in zip(self.parts, h.split(self.rank, dim=-1))]
        return self.scale * self._assemble(outs)

    def _assemble(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """The parts' outputs in the base's output layout: megatron-core's fused QKV interleaves each query group's
        q heads, k and v; a gated fc1 holds [gate; up] on each rank."""
        if self.target != "linear_qkv":
            return torch.cat(outs, dim=-1)
        g = self.groups_local
        return torch.cat([o.unflatten(-1, (g, -1)) for o in outs], dim=-1).flatten(-2)

    def load_full(self, part: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Set `part` from its full (TP = 1) A [rank, in] and B [out, rank]."""
        t, r = self.tp_group.size(), self.tp_group.rank()
        with torch.no_grad():
            getattr(self, f"{part}_a").copy_(a if self.column else a.chunk(t, dim=1)[r])
            getattr(self, f"{part}_b").copy_(b.chunk(t, dim=0)[r] if self.column else b)


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: megatron-core's frozen-weight linear multiplies the
    incoming gradient as it comes, and a strided bf16 one is two orders of magnitude slower on CPU (measured: 535 ms
    against 3.4 ms for [128, 4, 5632] x [5632, 1024])."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _add_adapters(module, args, output):
    """Forward hook of a base linear: (output, bias) -> (output + adapters(input), bias)."""
    adapters = module.lora
    if not adapters.enabled:
        return output
    out, bias = output
    return _ContiguousGradient.apply(out) + adapters(args[0]), bias


def _sharded_state_dict_with_adapters(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
    """The base's sharded state dict, its adapters split over TP as they are held (the base's own method would
    call every parameter that is not its weight or bias replicated)."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    state = type(self).sharded_state_dict(self, prefix, sharded_offsets, metadata)
    adapters = self.lora.state_dict(prefix="lora.", keep_vars=True)
    axes = {f"lora.{k}": v for k, v in self.lora.tp_axes().items()}
    state.update(make_sharded_tensors_for_checkpoint(adapters, prefix, axes, sharded_offsets))
    return state


def initial_a(seed: int, layer: int, target: str, part: str, rank: int, in_features: int) -> torch.Tensor:
    """A full adapter's A as PEFT draws it (Kaiming uniform, a = sqrt(5)), from `seed` and the adapter's place, so
    that every layout starts from the same adapters."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed} {layer} {target} {part}".encode()))
    bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on [rank, in]: sqrt(6 / ((1 + 5) * in))
    return torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator)


def add_adapters(model, lora_cfg, config, seed: int, tp_group) -> None:
    """Give `model`'s (this stage's GPTModel) target linears adapters and freeze everything else."""
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in model.decoder.layers:
        for target in lora_cfg.target_modules:
            base = layer.self_attention if target in ("linear_qkv", "linear_proj") else layer.mlp
            linear = getattr(base, target)
            full_a = {part: initial_a(seed, layer.layer_number, target, part, lora_cfg.rank, in_features)
                      for part, (_, in_features) in full_shapes(target, config).items()}
            linear.lora = AdapterSet(target, config, lora_cfg.rank, lora_cfg.alpha, tp_group, full_a).to(
                config.params_dtype)
            linear.register_forward_hook(_add_adapters)
            linear.sharded_state_dict = types.MethodType(_sharded_state_dict_with_adapters, linear)


def adapter_sets(model) -> list[tuple[int, AdapterSet]]:
    """(global layer number from 1, AdapterSet) of every adapted linear of `model`."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    found = []
    for layer in (m for m in model.modules() if isinstance(m, TransformerLayer)):
        found += [(layer.layer_number, m) for m in layer.modules() if isinstance(m, AdapterSet)]
    return found


def is_adapter_key(key: str) -> bool:
    return ".lora." in key


@contextlib.contextmanager
def adapters_disabled(model):
    """While inside, `model` is its base: every adapter's output is left out."""
    sets = [s for _, s in adapter_sets(model)]
    for s in sets:
        s.enabled = False
    try:
        yield
    finally:
        for s in sets:
            s.enabled = True
