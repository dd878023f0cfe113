"""LoRA adapters on megatron-core's parallel linears, laid out as the base is.

An adapter adds  scale * B (A x)  (scale = alpha / rank) to a base linear's output, with A [rank, in] and
B [out, rank]. The adapters follow PEFT's module split, so that they export to a Hugging Face PEFT adapter one to
one: the fused `linear_qkv` holds three (q_proj, k_proj, v_proj), a gated `linear_fc1` two (gate_proj, up_proj),
`linear_proj` (o_proj) and `linear_fc2` (down_proj) one each; a routed expert's gated fc1 holds one (gate_up_proj:
PEFT adapts transformers' fused expert tensor). They are children (`lora`) of the base linear, whose own parameters
keep their names, and a forward hook adds their output. Mixture-of-experts layers: the shared experts' linears are
laid out as a dense MLP's; each routed expert (SequentialMLP) has its own adapters, on the EP rank that holds it,
split over expert tensor parallelism (ETP) as its linears are (below).

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
Each adapter set costs one collective of `parts x rank` features beside the base's own (of `out` features). Every
adapter's gradient is reduced over data parallelism as its base weight's would be (a routed expert's under EP over
the expert data-parallel group).

Routed experts (ETP group size t, ETP 1 or ETP = TP): the dispatcher does their communication, for the adapters as
for the base (`explicit_expert_comm`): its gather over ETP hands every ETP rank the expert's whole tokens, and its
combine sums the ranks' partial outputs (a reduce-scatter over ETP). An expert's adapters therefore run without a
collective of their own, laid out as above (a gated fc1's one gate_up_proj B holding this rank's gate rows, then its
up rows, as the base's weight does). The replicated tensor's gradient (a column base's A, a row base's B) is then
partial over the ETP ranks; it is marked `sequence_parallel` (t > 1 needs SP: an MoE layer at TP > 1 has it), so
finalize_model_grads all-reduces it over TP, which is the ETP group where ETP = TP.

`adapters_disabled(model)` switches every adapter off: the model is then the base exactly (reference.mode: base).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import zlib

import torch

COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")
BLOCK_FFN = {"mlp": "ffn_hidden_size", "mlp.shared_experts": "moe_shared_expert_intermediate_size",
             "mlp.experts": "moe_ffn_hidden_size"}
"""The TransformerConfig field holding each MLP block's hidden size."""
HF_BLOCKS = {"self_attention": "self_attn", "mlp": "mlp", "mlp.shared_experts": "mlp.shared_expert",
             "mlp.experts": "mlp.experts"}
"""The Hugging Face submodule (of model.layers.N) of each megatron-core block."""


@dataclasses.dataclass(frozen=True)
class Site:
    """One linear of a transformer layer that can hold adapters."""

    block: str
    """self_attention, mlp (a dense MLP), mlp.shared_experts or mlp.experts (a routed expert)."""
    target: str
    """linear_qkv, linear_proj, linear_fc1 or linear_fc2."""
    expert: int | None = None
    """A routed expert's global index."""

    @property
    def path(self) -> str:
        """The linear's path in its layer, a routed expert's without its index (mlp.experts.linear_fc1)."""
        return f"{self.block}.{self.target}"

    @property
    def column(self) -> bool:
        return self.target in COLUMN_PARALLEL

    def selected_by(self, targets) -> bool:
        return any(self.path == t or self.path.endswith("." + t) for t in targets)

    def hf_module(self, layer: int) -> str:
        """Its Hugging Face module name (a routed expert's as on the Hub: model.layers.N.mlp.experts.E)."""
        expert = "" if self.expert is None else f".{self.expert}"
        return f"model.layers.{layer}.{HF_BLOCKS[self.block]}{expert}"


def part_names(site: Site, gated: bool) -> tuple[str, ...]:
    """PEFT's names of the adapters a linear holds: a routed expert's gated fc1 is one (PEFT adapts transformers'
    fused gate_up_proj of the experts), a dense or shared one two."""
    if site.target == "linear_fc1":
        if site.block == "mlp.experts":
            return ("gate_up_proj",) if gated else ("up_proj",)
        return ("gate_proj", "up_proj") if gated else ("up_proj",)
    return {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
            "linear_fc2": ("down_proj",)}[site.target]


def full_shapes(site: Site, config) -> dict[str, tuple[int, int]]:
    """{part: (out, in)} of the full (TP = 1) adapters of `site` for a megatron-core TransformerConfig."""
    d = config.kv_channels
    heads, groups, hidden = config.num_attention_heads, config.num_query_groups, config.hidden_size
    if site.target == "linear_qkv":
        return {"q_proj": (heads * d, hidden), "k_proj": (groups * d, hidden), "v_proj": (groups * d, hidden)}
    if site.target == "linear_proj":
        return {"o_proj": (hidden, heads * d)}
    ffn = getattr(config, BLOCK_FFN[site.block])
    if site.target == "linear_fc2":
        return {"down_proj": (hidden, ffn)}
    parts = part_names(site, config.gated_linear_unit)
    out = 2 * ffn if parts == ("gate_up_proj",) else ffn
    return dict.fromkeys(parts, (out, hidden))


def layer_sites(layer) -> list[tuple[Site, torch.nn.Module]]:
    """(Site, megatron-core linear) of every linear of a TransformerLayer that can hold adapters; a routed expert's
    on the EP rank holding it."""
    found = [(Site("self_attention", t), getattr(layer.self_attention, t)) for t in ("linear_qkv", "linear_proj")]
    mlp, fc = layer.mlp, ("linear_fc1", "linear_fc2")
    experts = getattr(mlp, "experts", None)
    if experts is None:
        return found + [(Site("mlp", t), getattr(mlp, t)) for t in fc]
    if getattr(mlp, "shared_experts", None) is not None:
        found += [(Site("mlp.shared_experts", t), getattr(mlp.shared_experts, t)) for t in fc]
    for index, expert in zip(mlp.local_expert_indices, experts.local_experts):
        found += [(Site("mlp.experts", t, index), getattr(expert, t)) for t in fc]
    return found


class AdapterSet(torch.nn.Module):
    """The adapters of one base linear on this TP rank: parameters `<part>_a` and `<part>_b`."""

    def __init__(self, site: Site, config, rank: int, alpha: float, linear, full_a: dict[str, torch.Tensor],
                 dropout: float = 0.0):
        """`linear`: the base (its TP group, its experts' communication, its weights' gradient-reduction flag);
        `full_a`: {part: [rank, in] full A} (the same on every rank); B starts at zero; `dropout`: on each part's
        input in training mode (PEFT's lora_dropout: one mask per part)."""
        super().__init__()
        self.site, self.rank, self.scale, self.dropout = site, rank, alpha / rank, dropout
        self.column = site.column
        self.tp_group = linear.tp_group
        # a routed expert's linear takes its tokens from the dispatcher, which does the experts' communication
        self.expert_comm = getattr(linear, "explicit_expert_comm", False)
        self.sp = config.sequence_parallel and not self.expert_comm
        if self.expert_comm and self.tp_group.size() > 1:
            _check_etp_is_tp(self.tp_group, config)
        self.gated_rows = site.block == "mlp.experts" and full_shapes(site, config).keys() == {"gate_up_proj"}
        self.groups_local = config.num_query_groups // self.tp_group.size()
        self.enabled = True
        t, r = self.tp_group.size(), self.tp_group.rank()
        self.parts = tuple(full_a)
        for part, (out, _) in full_shapes(site, config).items():
            a = full_a[part] if self.column else full_a[part].chunk(t, dim=1)[r]
            b = torch.zeros(out // t if self.column else out, rank, dtype=a.dtype)
            self.register_parameter(f"{part}_a", torch.nn.Parameter(a.contiguous()))
            self.register_parameter(f"{part}_b", torch.nn.Parameter(b))
        self._mark_parameters(getattr(linear.weight, "allreduce", True))

    @property
    def target(self) -> str:
        return self.site.target

    def _mark_parameters(self, allreduce: bool) -> None:
        """Split parameters are tensor-parallel (the gradient norm counts them on every rank); replicated ones whose
        gradients are partial over the sequence shards are `sequence_parallel` (all-reduced over TP); all are
        reduced over data parallelism as the base's weight would be (`allreduce` False: a routed expert's under EP,
        reduced over the expert data-parallel group, its own optimizer's)."""
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        for param in self.parameters():
            param.allreduce = allreduce
        for part in self.parts:
            split, replicated = (getattr(self, f"{part}_b"), getattr(self, f"{part}_a")) if self.column else \
                (getattr(self, f"{part}_a"), getattr(self, f"{part}_b"))
            if self.tp_group.size() > 1:
                set_tensor_model_parallel_attributes(split, True, 0 if self.column else 1, 1)
            elif self.site.block == "mlp.experts":  # its own on this rank whatever the dense TP rank: counted by
                for param in (split, replicated):  # the gradient norm on every TP rank, as megatron-core marks
                    set_tensor_model_parallel_attributes(param, True, 0, 1)  # its expert weights
            # partial over the sequence shards, or over the ETP ranks (a routed expert's): all-reduced over TP
            replicated.sequence_parallel = self.sp or (self.expert_comm and self.tp_group.size() > 1)

    def tp_axes(self) -> dict[str, int]:
        """{parameter name: TP-split axis} for the dist checkpoint (replicated ones absent)."""
        return {f"{p}_b" if self.column else f"{p}_a": 0 if self.column else 1 for p in self.parts}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the base linear's input; returns scale * B A x in the base's output layout on this rank."""
        from megatron.core import tensor_parallel as tp

        a = torch.cat([getattr(self, f"{p}_a") for p in self.parts])  # [parts * r, in(/t)]
        if self.dropout and self.training:  # one mask per part
            with self._dropout_generator():
                h = torch.cat([torch.matmul(dropout(x, self.dropout), a_part.t().to(x.dtype))
                               for a_part in a.split(self.rank)], dim=-1)
        else:
            h = torch.matmul(x, a.t().to(x.dtype))  # [s(/t), b, parts * r]
        if self.expert_comm:
            pass  # the dispatcher's gather and combine over ETP serve the adapters as they serve the base
        elif self.column:
            h = tp.gather_from_sequence_parallel_region(h, True, self.tp_group) if self.sp else \
                tp.copy_to_tensor_model_parallel_region(h, self.tp_group)
        else:
            h = tp.reduce_scatter_to_sequence_parallel_region(h, self.tp_group) if self.sp else \
                tp.reduce_from_tensor_model_parallel_region(h, self.tp_group)
        outs = [torch.matmul(hp, getattr(self, f"{p}_b").t().to(x.dtype))
                for p, hp in zip(self.parts, h.split(self.rank, dim=-1))]
        return self.scale * self._assemble(outs)

    def _dropout_generator(self):
        """Where the input is the same on every TP rank (a column-parallel base without SP) the mask is too: the
        default generator, the same on every TP rank, or for a routed expert at ETP = TP > 1 (its ETP ranks hold
        the same tokens) megatron-core's data-parallel tracker, seeded alike on every rank (the default generator
        was measured out of step across the ETP ranks there: their masks differed). Where it is split (a
        row-parallel base's input, sequence shards, a routed expert's tokens at ETP 1) the model-parallel tracker's,
        different on each TP rank, as megatron-core forks it for split activations."""
        from megatron.core import tensor_parallel

        tracker = tensor_parallel.get_cuda_rng_tracker()
        if self.column and not self.sp and self.site.expert is None:
            return contextlib.nullcontext()
        if self.column and self.expert_comm and self.tp_group.size() > 1:
            return tracker.fork(tensor_parallel.random.get_data_parallel_rng_tracker_name())
        return tracker.fork()

    def _assemble(self, outs: list[torch.Tensor]) -> torch.Tensor:
        return assemble(self.target, outs, self.groups_local, dim=-1)

    def load_full(self, part: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Set `part` from its full (TP = 1) A [rank, in] and B [out, rank]."""
        t, r = self.tp_group.size(), self.tp_group.rank()
        if self.column:  # a routed expert's gated fc1: this rank's gate rows, then its up rows
            b = torch.cat([half.chunk(t, dim=0)[r] for half in (b.chunk(2) if self.gated_rows else [b])])
        else:
            a = a.chunk(t, dim=1)[r]
        with torch.no_grad():
            getattr(self, f"{part}_a").copy_(a)
            getattr(self, f"{part}_b").copy_(b)


def _check_etp_is_tp(etp_group, config) -> None:
    """A routed expert's adapters at ETP > 1 need the ETP group to be the TP group (ETP = TP): megatron-core reduces
    their replicated gradients over TP (finalize_model_grads) and counts them in the gradient norm on TP rank 0."""
    from megatron.core import parallel_state

    dense = parallel_state.get_tensor_model_parallel_group()
    same = torch.distributed.get_process_group_ranks(etp_group) == torch.distributed.get_process_group_ranks(dense)
    if not (same and config.sequence_parallel):
        raise ValueError("LoRA on routed experts needs expert tensor parallelism 1 or equal to TP, with SP")


def assemble(target: str, outs: list[torch.Tensor], groups: int, dim: int) -> torch.Tensor:
    """The parts' outputs (or weights) joined along `dim` in the base's output layout: megatron-core's fused QKV
    interleaves each of its `groups` query groups' q heads, k and v; a gated fc1 holds [gate; up] (on each rank)."""
    if target != "linear_qkv":
        return torch.cat(outs, dim=dim)
    dim = dim % outs[0].dim()
    return torch.cat([o.unflatten(dim, (groups, -1)) for o in outs], dim=dim + 1).flatten(dim, dim + 1)


def merged_delta(site: Site, factors: list[tuple[torch.Tensor, torch.Tensor]], scale: float,
                 num_query_groups: int) -> torch.Tensor:
    """[out, in] fp32: what the full adapters (A, B) of `site`'s parts, in part order, add to its full megatron-core
    weight."""
    return scale * assemble(site.target, [b.float() @ a.float() for a, b in factors], num_query_groups, dim=0)


def config_sites(model_cfg, layer: int) -> list[Site]:
    """The Sites of global layer `layer` (from 0) of a config.ModelConfig, as layer_sites finds them in the built
    model (every routed expert's)."""
    found = [Site("self_attention", "linear_qkv"), Site("self_attention", "linear_proj")]
    fc = ("linear_fc1", "linear_fc2")
    m = model_cfg
    if m.num_experts is None or (m.moe_layers is not None and not m.moe_layers[layer]):
        return found + [Site("mlp", t) for t in fc]
    if m.moe_shared_expert_ffn_hidden_size:
        found += [Site("mlp.shared_experts", t) for t in fc]
    return found + [Site("mlp.experts", t, e) for e in range(m.num_experts) for t in fc]


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """An adapter's input dropout (training mode only: AdapterSet checks)."""
    return torch.nn.functional.dropout(x, p, training=True)


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
    sharded = make_sharded_tensors_for_checkpoint(adapters, prefix, axes, sharded_offsets, tp_group=self.tp_group,
                                                  dp_cp_group=metadata["dp_cp_group"])
    if self.lora.gated_rows:  # [gate rows; up rows] of this rank: stored as megatron-core stores a gated fc1
        key = f"{prefix}lora.gate_up_proj_b"
        sharded[key] = _gated_rows_factory(sharded[key], sharded_offsets, metadata)
    state.update(sharded)
    return state


def _gated_rows_factory(sharded_tensor, sharded_offsets, metadata):
    """megatron-core's SwiGLU factory (its gated fc1 weight's): the gate and up halves stored as two TP-split
    tensors, so that the global tensor is [gate; up] whatever the ETP (0.16 and 0.19 take these arguments alike;
    0.19's extra groups serve FSDP2 parameters only)."""
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    return apply_swiglu_sharded_factory(sharded_tensor, sharded_offsets,
                                        (metadata or {}).get("singleton_local_shards", False))


def initial_a(seed: int, layer: int, target: str, part: str, rank: int, in_features: int) -> torch.Tensor:
    """A full adapter's A as PEFT draws it (Kaiming uniform, a = sqrt(5)), from `seed` and the adapter's place, so
    that every layout starts from the same adapters."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed} {layer} {target} {part}".encode()))
    bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on [rank, in]: sqrt(6 / ((1 + 5) * in))
    return torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator)


def add_adapters(model, lora_cfg, config, seed: int) -> None:
    """Give `model`'s (this stage's GPTModel) target linears adapters and freeze everything else."""
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in model.decoder.layers:
        for site, linear in layer_sites(layer):
            if site.selected_by(lora_cfg.target_modules):
                _adapt(linear, site, layer.layer_number, lora_cfg, config, seed)


def _adapt(linear, site: Site, layer_number: int, lora_cfg, config, seed: int) -> None:
    place = site.target if site.block in ("self_attention", "mlp") else \
        f"{site.block}.{site.target}" + ("" if site.expert is None else f".{site.expert}")
    full_a = {part: initial_a(seed, layer_number, place, part, lora_cfg.rank, in_features)
              for part, (_, in_features) in full_shapes(site, config).items()}
    linear.lora = AdapterSet(site, config, lora_cfg.rank, lora_cfg.alpha, linear, full_a, lora_cfg.dropout).to(
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
