"""The training configuration: small dataclasses read from YAML, overridden by `key=value`, validated up front.

Every problem is a ConfigError naming the file and the dotted key; nothing is built before the whole config
has been checked. Defaults follow the paper where it speaks (beta 0.04, warmup ratio 0.1, linear decay,
dropout 0 - dropout is not configurable: fine-tuning here always runs without it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field

import yaml

from minorsft_megatron.errors import UserError
from minorsft_megatron.loss import LOSSES, REF_LOGITS, REF_SUMS

DTYPES = ("bf16", "fp16", "fp32")
OPTIMIZER_SHARDINGS = ("dp_reshardable", "fully_reshardable")


class ConfigError(UserError):
    """A config problem, one line: FILE: key: what is wrong."""


@dataclass
class ModelConfig:
    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    """MLP width (per branch of SwiGLU)."""
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None: as many as attention heads."""
    kv_channels: int | None = None
    """Head dimension; None: hidden_size / num_attention_heads (Qwen3 sets its own)."""
    vocab_size: int | None = None
    """Tokenizer vocabulary; None: taken from the training data's sidecar. Padded to a multiple of 1024."""
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    rope_scaling_factor: float | None = None
    """Llama 3.1 RoPE scaling (low/high frequency factors 1 and 4, original length 8192); None: off."""
    normalization: str = "RMSNorm"
    """RMSNorm or LayerNorm."""
    norm_epsilon: float = 1e-5
    activation: str = "swiglu"
    """swiglu (gated SiLU: Llama, Qwen, Mistral) or gelu."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection (Qwen2)."""
    qk_layernorm: bool = False
    """RMSNorm on queries and keys per head (Qwen3)."""
    tie_embeddings: bool = False
    """Share the input embedding and the output layer."""
    spec: str = "auto"
    """megatron-core layer spec: te (Transformer Engine, GPU), local, or auto (te where Transformer Engine imports
    on a GPU, local otherwise)."""
    init_method_std: float = 0.02
    """Std of the random initialisation (used when no starting checkpoint is given)."""
    num_experts: int | None = None
    """Routed experts of each mixture-of-experts layer (megatron-core's MoELayer); None: a dense model."""
    moe_layers: list[int] | None = None
    """Per layer, 1 for an MoE layer and 0 for a dense one (ffn_hidden_size wide): Qwen's mlp_only_layers,
    DeepSeek's first-k-dense; None: every layer is MoE."""
    moe_router_topk: int = 2
    """Experts each token is routed to."""
    moe_ffn_hidden_size: int | None = None
    """Each routed expert's FFN width (per branch of SwiGLU); None: ffn_hidden_size."""
    moe_shared_expert_ffn_hidden_size: int | None = None
    """Width of the shared expert every token also goes through (Qwen2-MoE); None: no shared expert."""
    moe_shared_expert_gate: bool = False
    """Scale the shared expert's output by sigmoid(x . w_gate) (Qwen2-MoE's shared_expert_gate)."""
    moe_router_score_function: str = "softmax"
    """softmax or sigmoid router scores."""
    moe_norm_topk_prob: bool = True
    """Renormalise the chosen experts' weights to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob); false: the
    full softmax's probabilities of the chosen experts (Qwen2-MoE). Sigmoid scores are always renormalised."""
    moe_load_balancing: str = "aux_loss"
    """aux_loss (the switch-transformer load-balancing loss of each micro-batch) or none."""
    moe_aux_loss_coeff: float = 0.0
    """Coefficient of the load-balancing loss (docs/training.md: how it enters the gradient)."""
    moe_z_loss_coeff: float = 0.0
    """Coefficient of the router z-loss (mean of logsumexp(router logits)^2); 0: off."""
    moe_router_fp32: bool = True
    """Router GEMM, scores and auxiliary losses in fp32 whatever precision.dtype is."""
    moe_capacity_factor: float | None = None
    """Expert capacity (tokens per expert, as a multiple of the even share) beyond which tokens are dropped;
    None: dropless routing (the default, and the only one a reference may use)."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    sp: bool = False
    """Sequence parallelism (needs tp > 1)."""
    cp: int = 1
    """Context-parallel size (needs the te spec)."""
    ep: int = 1
    """Expert-parallel size: the routed experts are split over this many ranks (MoE models)."""
    etp: int | None = None
    """Expert tensor-parallel size: each expert's FFN split over this many ranks; None: tp."""
    moe_dispatcher: str = "alltoall"
    """How tokens reach their experts' ranks: alltoall or allgather (megatron-core's token dispatchers)."""
    overlap_grad_reduce: bool | None = None
    """Reduce gradients over data-parallel ranks bucket by bucket during the last micro-batch's backward
    (megatron-core's overlap_grad_reduce; the same sums, computed while backward runs). None: on a GPU, off on
    CPU processes."""
    overlap_param_gather: bool | None = None
    """With the distributed optimizer: all-gather the updated parameters bucket by bucket during the next
    forward instead of at the end of the optimizer step (megatron-core's overlap_param_gather; needs
    overlap_grad_reduce). Checkpoints are saved after a forced gather. None: on a GPU, off on CPU processes."""


@dataclass
class PrecisionConfig:
    dtype: str = "bf16"
    """Policy compute and parameter dtype: bf16, fp16 or fp32 (the optimizer keeps fp32 master weights)."""
    fp8: str | None = None
    """FP8 compute through Transformer Engine: null, hybrid (e4m3 forward, e5m2 gradients) or e4m3 (GPU)."""
    fp8_recipe: str = "delayed"
    """Scaling recipe: delayed, tensorwise, blockwise or mxfp8 (each needs a recent enough GPU and TE)."""
    initial_loss_scale: float = 65536.0
    """fp16 only: the dynamic loss scale to start from (halved after every 2 consecutive overflowing steps, which
    are skipped; doubled after loss_scale_window clean steps)."""
    loss_scale_window: int = 1000
    """fp16 only: clean steps before the loss scale grows."""


@dataclass
class LossConfig:
    name: str = "minor_sft"
    """sft | sft_seq | minor_sft | sft_dpo | dft | iw_sft | iw_sft_token | asft | sft_kl (README's losses table)."""
    beta: float = 0.04
    """MinorSFT's and SFT-using-DPO's beta (the paper: 0.04); also sets the logged weights 2 sigmoid(-beta D)."""
    kl_coef: float = 0.1
    """lambda of asft and sft_kl: the weight of KL(pi_ref || pi_theta) at each answer token (ASFT's code uses 0.1,
    its README 0.05)."""
    logprob_chunk_size: int = 256
    """Positions whose logits exist at a time: the output layer and the log-probs run fused, chunk by chunk,
    without a full-vocabulary logits tensor (training, the co-located reference, score, generate); 0: the model
    outputs all logits at once."""


@dataclass
class OptimizerConfig:
    lr: float = 2e-5
    min_lr: float = 0.0
    warmup_ratio: float = 0.1
    """Fraction of the training steps with linear warmup from 0."""
    decay: str = "linear"
    """linear or cosine decay to min_lr after warmup."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 turns it off."""
    distributed: bool = False
    """megatron-core's distributed optimizer (optimizer state sharded over data-parallel ranks; GPU)."""


@dataclass
class DataConfig:
    prefix: str = ""
    """Output prefix of tools/preprocess_sft_data.py."""
    seq_length: int = 2048
    packing: bool = False
    micro_batch_size: int = 1
    """Rows per micro-batch."""
    global_batch_size: int = 64
    """Samples per optimizer step."""
    epochs: int = 1
    seed: int = 1234
    """Shuffling seed."""
    valid: dict[str, str] | str | None = None
    """Held-out sets evaluated during training (logging.eval_interval): {NAME: PREFIX, ...} of datasets written by
    tools/preprocess_sft_data.py with training's tokenizer and chat template, or one PREFIX (named `valid`);
    None: no evaluation. Evaluated in sample order with training's seq_length, packing and micro_batch_size."""


@dataclass
class ReferenceConfig:
    mode: str | None = None
    """colocated (a frozen second model beside the policy), cache (log-probs from `score`), base (LoRA: the policy
    itself with its adapters off, no second copy), none (no reference: sft, sft_seq and dft only; m_theta is then
    not logged); None: base with LoRA, else colocated. A cache holds per-sample sums: not for iw_sft_token."""
    cache: str | None = None
    """Reference cache JSONL written by `python -m minorsft_megatron.score` (mode cache)."""
    precision: str = "bf16"
    """The co-located reference's weights and forward: bf16, fp16, fp32, or fp8 (bf16 weights, FP8 compute with
    precision.fp8_recipe). Logits become log-probs in fp32 whatever this is."""
    fp8_weights: bool = False
    """Store the reference's weights in FP8 (Transformer Engine FP8 parameters), about half the memory of bf16."""
    offload: bool = False
    """Keep the co-located reference's weights in CPU memory between its forwards."""
    micro_batch_size: int | None = None
    """Rows per micro-batch of the co-located reference's forward: a multiple of data.micro_batch_size (it keeps
    no activations, so it can run larger ones, with fewer collectives per row); None: data.micro_batch_size.
    Larger is not always faster: on CPU, 16 rows of 128 positions beat 32 (docs/performance.md)."""


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "mlp.linear_fc1", "mlp.linear_fc2",
                "experts.linear_fc1", "experts.linear_fc2", "shared_experts.linear_fc1", "shared_experts.linear_fc2")
"""What `lora.target_modules` takes. As Megatron-Bridge matches them, a name picks every linear whose path in its
layer (lora.Site.path) ends with it: `linear_fc1` is every fc1 (dense MLPs, routed experts, shared experts),
`mlp.linear_fc1` the dense MLPs' alone, `experts.linear_fc1` the routed experts', `shared_experts.linear_fc1` the
shared experts'."""
LORA_DEFAULT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class LoraConfig:
    rank: int = 0
    """Adapter rank; 0: no LoRA (full fine-tuning)."""
    alpha: float = 32.0
    """The adapters' output is scaled by alpha / rank (PEFT's lora_alpha)."""
    dropout: float = 0.0
    """Dropout on the adapters' input in training (PEFT's lora_dropout: one mask per adapter), in [0, 1). The
    reference (reference.mode: base, adapters off), evaluation, score and generate never see it."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_DEFAULT_TARGETS))
    """megatron-core linears that get adapters (PEFT modules), matched by the end of their path in the layer as
    Megatron-Bridge matches them: linear_qkv (q_proj, k_proj, v_proj), linear_proj (o_proj), linear_fc1 (gate_proj,
    up_proj; a routed expert's fused gate_up_proj) and linear_fc2 (down_proj) of every MLP, dense or expert;
    mlp.linear_fc1/2 the dense MLPs' alone, experts.linear_fc1/2 the routed experts', shared_experts.linear_fc1/2
    the shared experts'. Every other weight (routers included) stays frozen."""


@dataclass
class CheckpointConfig:
    init: str | None = None
    """Starting checkpoint (megatron-core dist checkpoint); None: random initialisation from `seed`."""
    save: str | None = None
    """Where to save; None: OUTPUT_DIR/checkpoints."""
    load: str | None = None
    """Resume from here; None: resume from `save` when it holds a checkpoint."""
    interval: int = 0
    """Save every N steps (0: only at the end)."""
    save_final: bool = True
    """Save at the iteration this invocation stops at (train_steps, or stop_at_step). false with interval 0: a
    run that writes no checkpoint (a benchmark)."""
    override_schedule: bool = False
    """On resume, recompute the learning-rate schedule from this config (lr, min_lr, warmup_ratio, decay,
    weight_decay, train_steps) where it differs from the checkpoint's; without it such a resume is refused."""
    keep: int | None = None
    """Keep the newest N checkpoints (None: all)."""
    keep_best: str | None = None
    """SET/METRIC (e.g. held_out/nll_per_token): also keep the saved checkpoint with the best value of that
    held-out figure (lowest; accuracy: highest), never pruned by `keep`, named in SAVE/best_checkpoint.json. Every
    save must follow an evaluation: interval a multiple of logging.eval_interval."""
    optimizer_sharding: str = "dp_reshardable"
    """How the distributed optimizer's state is saved (megatron-core's distrib_optim_sharding_type, recorded in
    the checkpoint): dp_reshardable (each rank writes its shard; resumes under another data-parallel size at the
    same TP/PP/CP) or fully_reshardable (gathered into model space; resumes under any layout, at the cost of a
    gather on data-parallel rank 0 at every save)."""


@dataclass
class LoggingConfig:
    interval: int = 1
    """Steps between console lines (every step goes to metrics.jsonl and TensorBoard)."""
    tensorboard: bool = True
    progress_bar: bool | None = None
    """None: when stdout is a terminal."""
    moe_per_layer: bool = False
    """MoE: also log each MoE layer's auxiliary losses and expert load (as Megatron-LM's --moe-per-layer-logging);
    their means over layers (and the worst layer's load) are always logged."""
    eval_interval: int | None = None
    """Steps between evaluations of data.valid (also at step 0 and after the last step, as TRL's eval_on_start);
    None: at step 0 and after the last step only."""
    eval_samples: int | None = None
    """Evaluate the first N samples of each set (the same ones every time, whatever the layout); None: all."""
    eval_generate: int = 0
    """Every K-th evaluation also decodes greedy answers to each set's prompts and logs their exact-match accuracy
    (answers cut and compared as `generate` does); 0: never. Needs pp = cp = 1 and no sequence parallelism."""
    eval_max_new_tokens: int = 64
    """Longest greedy answer of eval_generate, in tokens."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/minor_sft"
    """Run directory: metrics.jsonl, tensorboard/, checkpoints/, config.yaml."""
    seed: int = 1234
    """Initialisation and RNG seed."""
    device: str | None = None
    """cuda or cpu; None: cuda when available."""
    train_steps: int | None = None
    """Length of the run and of its learning-rate schedule; None: all steps of data.epochs."""
    stop_at_step: int | None = None
    """Save and stop once this iteration is reached (a time-limited job); the same command resumes."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


# ---- reading ------------------------------------------------------------------------------------------------

def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    return tp.__name__


_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_value(value, tp, where: str):
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if typing.get_origin(option) is list and isinstance(value, list):
            (item,) = typing.get_args(option)
            return [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        if typing.get_origin(option) is dict and isinstance(value, dict):
            key_type, item = typing.get_args(option)
            return {_check_value(k, key_type, f"{where} (a key)"): _check_value(v, item, f"{where}.{k}")
                    for k, v in value.items()}
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(float(value), where)
        if option is float and isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return _finite(float(value), where)  # YAML 1.1 reads 1e-5 (no dot) as a string; users mean a number
        if option is str and isinstance(value, str):
            return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _finite(value: float, where: str) -> float:
    if not math.isfinite(value):  # YAML's .inf and .nan, 1e400
        raise ConfigError(f"{where}: must be a finite number, got {value}")
    return value


class Source(str):
    """The config file's path (what messages name), knowing which dotted keys command-line overrides set."""

    def __new__(cls, path: str, overridden: set[str] = frozenset()):
        source = super().__new__(cls, path)
        source.overridden = set(overridden)
        return source

    @classmethod
    def of(cls, path: str, overrides) -> "Source":
        """The source of a config read from `path` with `key=value` `overrides`."""
        return cls(path, {override.split("=", 1)[0] for override in overrides})


def _where(source, key: str) -> str:
    """`FILE: key`, or `command line: key` when an override set it."""
    return f"command line: {key}" if key in getattr(source, "overridden", ()) else f"{source}: {key}"


def from_dict(cls, data, source: str, prefix: str = ""):
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types (named by dotted key)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the config'}: expected a mapping, got "
                          f"{type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{_where(source, prefix + key)}: unknown key (known: {', '.join(sorted(known))})")
    values = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = from_dict(tp, value, source, f"{prefix}{key}.")
        else:
            values[key] = _check_value(value, tp, _where(source, f"{prefix}{key}"))
    return cls(**values)


def apply_override(data: dict, override: str, source: str = "command line") -> None:
    """Set `a.b.c=value` (value read as YAML) in the nested mapping `data`."""
    if "=" not in override:
        raise ConfigError(f"{source}: {override!r}: expected key=value")
    key, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: {key}: cannot read value {text!r}: {str(err).splitlines()[0]}")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {key}: {part} is not a section")
    node[parts[-1]] = value


def load_config(path: str, overrides: list[str] = ()) -> TrainConfig:
    """Read, override, take the model from `checkpoint.init` if given, validate; ConfigError names file and key."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}")
    for override in overrides:
        apply_override(data, override)
    path = Source.of(path, overrides)
    config = from_dict(TrainConfig, data, path)
    if config.checkpoint.init is not None and os.path.isdir(config.checkpoint.init):
        from minorsft_megatron.checkpoint import CheckpointError, read_state

        try:
            state = read_state(config.checkpoint.init)
        except CheckpointError as err:
            raise ConfigError(f"{path}: checkpoint.init: {err}")
        saved, trained = state["config"], "scheduler" in state  # a training run's, not a starting checkpoint
        saved_model = saved["model"]
        _require(not trained or (saved.get("lora") or {}).get("rank", 0) == 0, path, "checkpoint.init",
                 f"{config.checkpoint.init} is a LoRA run's checkpoint (adapters): resume it with "
                 "checkpoint.load, or start from its merged export (megatron-to-hf, then hf-to-megatron)")
        adopt_model_config(config, saved_model, set(data.get("model") or {}), path, config.checkpoint.init)
    validate(config, path)
    return config


TRAINING_MODEL_KEYS = {"moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_load_balancing", "moe_capacity_factor",
                       "moe_router_fp32"}
"""Model keys that are how a run trains, not what the model is: a config may set them beside checkpoint.init."""


def adopt_model_config(c: TrainConfig, saved_model: dict, explicit_keys: set[str], source: str,
                       checkpoint_path: str) -> None:
    """Take the model architecture from a starting checkpoint. `explicit_keys`, the model keys the config set
    itself, must agree with it (model.spec excepted: local or te is a choice of implementation, not of model; and
    TRAINING_MODEL_KEYS, which the config's values override)."""
    saved = from_dict(ModelConfig, saved_model, f"{checkpoint_path} (saved config)")
    for key in sorted(explicit_keys & TRAINING_MODEL_KEYS):
        setattr(saved, key, getattr(c.model, key))
    for key in sorted(explicit_keys - {"spec"} - TRAINING_MODEL_KEYS):
        mine, theirs = getattr(c.model, key), getattr(saved, key)
        _require(mine == theirs, source, f"model.{key}",
                 f"{mine!r} here but {theirs!r} in checkpoint.init {checkpoint_path}; leave it out to use the checkpoint's")
    saved.spec = c.model.spec
    c.model = saved


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


# ---- checks -------------------------------------------------------------------------------------------------

def _require(ok: bool, source: str, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{_where(source, key)}: {message}")


def _choice(value, choices, source, key):
    _require(value in choices, source, key, f"{value!r} is not one of {', '.join(map(str, choices))}")


def _validate_model(c: TrainConfig, source: str) -> None:
    m = c.model
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "max_position_embeddings"):
        _require(getattr(m, key) >= 1, source, f"model.{key}", "must be at least 1")
    _require(m.kv_channels is not None or m.hidden_size % m.num_attention_heads == 0, source,
             "model.num_attention_heads", f"must divide hidden_size {m.hidden_size} (or set model.kv_channels)")
    _require(m.num_attention_heads % _query_groups(m) == 0, source, "model.num_query_groups",
             f"must divide num_attention_heads {m.num_attention_heads}")
    _require(m.rotary_base > 0, source, "model.rotary_base", "must be positive")
    _require(m.rope_scaling_factor is None or m.rope_scaling_factor >= 1, source, "model.rope_scaling_factor",
             "must be at least 1 (or null)")
    _require(m.norm_epsilon > 0, source, "model.norm_epsilon", "must be positive")
    _require(m.init_method_std > 0, source, "model.init_method_std", "must be positive")
    _choice(m.normalization, ("RMSNorm", "LayerNorm"), source, "model.normalization")
    _choice(m.activation, ("swiglu", "gelu"), source, "model.activation")
    _choice(m.spec, ("auto", "local", "te"), source, "model.spec")


def _query_groups(m: ModelConfig) -> int:
    return m.num_query_groups or m.num_attention_heads


def _validate_parallel(c: TrainConfig, source: str) -> None:
    m, p = c.model, c.parallel
    for key in ("tp", "pp", "cp"):
        _require(getattr(p, key) >= 1, source, f"parallel.{key}", "must be at least 1")
    _require(_query_groups(m) % p.tp == 0, source, "parallel.tp", f"must divide the {_query_groups(m)} query groups")
    _require(m.num_layers % p.pp == 0, source, "parallel.pp", f"must divide num_layers {m.num_layers}")
    _require(not p.sp or p.tp > 1, source, "parallel.sp", "needs parallel.tp > 1")
    _require(p.cp == 1 or m.spec != "local", source, "parallel.cp", "context parallelism needs model.spec: te")
    _require(not p.overlap_param_gather or c.optimizer.distributed, source, "parallel.overlap_param_gather",
             "needs optimizer.distributed: true (only the distributed optimizer gathers parameters)")
    _require(not p.overlap_param_gather or p.overlap_grad_reduce is not False, source,
             "parallel.overlap_param_gather", "needs parallel.overlap_grad_reduce (megatron-core overlaps both)")


MOE_LOAD_BALANCING = ("aux_loss", "none")
MOE_DISPATCHERS = ("alltoall", "allgather")
REFUSED_MOE = {
    "seq_aux_loss": "the per-sequence load-balancing loss is not tested here; use aux_loss or none",
    "global_aux_loss": "the global-batch load-balancing loss depends on the micro-batch order in megatron-core "
                       "(a running count); use aux_loss or none",
    "sinkhorn": "sinkhorn routing is not tested here; use aux_loss or none",
}


def _validate_moe(c: TrainConfig, source: str) -> None:
    m, p = c.model, c.parallel
    if m.num_experts is None:
        for key, default in (("ep", 1), ("etp", None)):
            _require(getattr(p, key) == default, source, f"parallel.{key}", "needs a mixture-of-experts model "
                     "(model.num_experts)")
        return
    _require(m.num_experts >= 2, source, "model.num_experts", "must be at least 2 (or null: a dense model)")
    _require(1 <= m.moe_router_topk <= m.num_experts, source, "model.moe_router_topk",
             f"must be between 1 and num_experts {m.num_experts}")
    if m.moe_layers is not None:
        _require(len(m.moe_layers) == m.num_layers and set(m.moe_layers) <= {0, 1} and any(m.moe_layers), source,
                 "model.moe_layers", f"must list 0 (dense) or 1 (MoE) for each of the {m.num_layers} layers, "
                 "at least one 1")
    for key in ("moe_ffn_hidden_size", "moe_shared_expert_ffn_hidden_size"):
        _require(getattr(m, key) is None or getattr(m, key) >= 1, source, f"model.{key}", "must be at least 1")
    _require(not m.moe_shared_expert_gate or m.moe_shared_expert_ffn_hidden_size, source,
             "model.moe_shared_expert_gate", "needs model.moe_shared_expert_ffn_hidden_size (a shared expert)")
    _choice(m.moe_router_score_function, ("softmax", "sigmoid"), source, "model.moe_router_score_function")
    _require(m.moe_router_score_function == "softmax" or m.moe_norm_topk_prob or m.moe_router_topk == 1, source,
             "model.moe_norm_topk_prob", "false needs softmax scores (megatron-core renormalises sigmoid scores)")
    _require(m.moe_load_balancing not in REFUSED_MOE, source, "model.moe_load_balancing",
             REFUSED_MOE.get(m.moe_load_balancing, ""))
    _choice(m.moe_load_balancing, MOE_LOAD_BALANCING, source, "model.moe_load_balancing")
    for key in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
        _require(getattr(m, key) >= 0, source, f"model.{key}", "must be >= 0")
    _require(m.moe_load_balancing != "none" or m.moe_aux_loss_coeff == 0, source, "model.moe_aux_loss_coeff",
             "must be 0 with moe_load_balancing: none")
    _require(m.moe_capacity_factor is None or m.moe_capacity_factor > 0, source, "model.moe_capacity_factor",
             "must be positive (or null: dropless)")
    etp = p.etp or p.tp
    _require(p.ep >= 1 and m.num_experts % p.ep == 0, source, "parallel.ep",
             f"must divide num_experts {m.num_experts}")
    _require(etp >= 1 and (m.moe_ffn_hidden_size or m.ffn_hidden_size) % etp == 0, source,
             "parallel.etp" if p.etp else "parallel.tp", "must divide the expert FFN width "
             f"{m.moe_ffn_hidden_size or m.ffn_hidden_size} (parallel.etp, or tp when etp is unset)")
    _require(p.ep * etp == 1 or p.tp == 1 or p.sp, source, "parallel.sp",
             "megatron-core needs sequence parallelism for expert parallelism beside tensor parallelism")
    _choice(p.moe_dispatcher, MOE_DISPATCHERS, source, "parallel.moe_dispatcher")


def _validate_precision_and_loss(c: TrainConfig, source: str) -> None:
    from minorsft_megatron.transformer_engine import FP8_FORMATS, FP8_RECIPES

    _choice(c.precision.dtype, DTYPES, source, "precision.dtype")
    _choice(c.precision.fp8, (None,) + FP8_FORMATS, source, "precision.fp8")
    _choice(c.precision.fp8_recipe, FP8_RECIPES, source, "precision.fp8_recipe")
    _require(c.precision.initial_loss_scale >= 1, source, "precision.initial_loss_scale", "must be at least 1")
    _require(c.precision.loss_scale_window >= 1, source, "precision.loss_scale_window", "must be at least 1")
    _choice(c.loss.name, tuple(LOSSES), source, "loss.name")
    _require(c.loss.beta > 0, source, "loss.beta", "must be positive")
    _require(c.loss.kl_coef > 0, source, "loss.kl_coef", "must be positive")
    _require(REF_LOGITS not in LOSSES[c.loss.name].reads or c.loss.logprob_chunk_size > 0, source,
             "loss.logprob_chunk_size", f"loss {c.loss.name} computes the KL to the reference fused, chunk by chunk: "
             "must be > 0")
    _require(c.loss.logprob_chunk_size >= 0, source, "loss.logprob_chunk_size", "must be >= 0 (0: off)")


def _validate_optimizer(c: TrainConfig, source: str) -> None:
    o = c.optimizer
    _require(o.lr > 0 and 0 <= o.min_lr <= o.lr, source, "optimizer.lr", "need lr > 0 and 0 <= min_lr <= lr")
    _require(0 <= o.warmup_ratio < 1, source, "optimizer.warmup_ratio", "must be in [0, 1)")
    _choice(o.decay, ("linear", "cosine"), source, "optimizer.decay")
    _require(o.clip_grad >= 0, source, "optimizer.clip_grad", "must be >= 0")
    _require(o.weight_decay >= 0, source, "optimizer.weight_decay", "must be >= 0")
    for key in ("adam_beta1", "adam_beta2"):
        _require(0 <= getattr(o, key) < 1, source, f"optimizer.{key}", "must be in [0, 1)")
    _require(o.adam_eps > 0, source, "optimizer.adam_eps", "must be positive")


def _validate_data(c: TrainConfig, source: str) -> None:
    d, p = c.data, c.parallel
    _require(bool(d.prefix), source, "data.prefix", "is required")
    _require(os.path.isfile(f"{d.prefix}.json"), source, "data.prefix",
             f"{d.prefix}.json not found (run tools/preprocess_sft_data.py first)")
    for key in ("seq_length", "micro_batch_size", "global_batch_size", "epochs"):
        _require(getattr(d, key) >= 1, source, f"data.{key}", "must be at least 1")
    _require(d.seq_length <= c.model.max_position_embeddings, source, "data.seq_length",
             f"exceeds model.max_position_embeddings {c.model.max_position_embeddings}")
    _require(not p.sp or d.seq_length % p.tp == 0, source, "data.seq_length",
             "must be a multiple of parallel.tp under sequence parallelism")
    _require(d.seq_length % (2 * p.cp) == 0 or p.cp == 1, source, "data.seq_length",
             "must be a multiple of 2 * parallel.cp")
    _require(not p.sp or p.cp == 1 or d.seq_length % (2 * p.cp * p.tp) == 0, source, "data.seq_length",
             f"must be a multiple of 2 * parallel.cp * parallel.tp = {2 * p.cp * p.tp} under sequence and context "
             "parallelism")
    _check_fp8_tokens(c, source)


def _check_fp8_tokens(c: TrainConfig, source: str) -> None:
    """FP8 GEMMs need their token count divisible by 16 (32 for mxfp8 and blockwise); packed micro-batches are
    padded to that, rows must hold it."""
    from minorsft_megatron.transformer_engine import fp8_token_multiple

    multiple, d, p = fp8_token_multiple(c), c.data, c.parallel
    if multiple == 1 or d.packing:
        return
    split = p.cp * (p.tp if p.sp else 1)
    tokens = d.micro_batch_size * d.seq_length // split
    _require(tokens % multiple == 0, source, "data.seq_length",
             f"FP8 GEMMs ({c.precision.fp8_recipe}) need the tokens of a micro-batch per rank, micro_batch_size * "
             f"seq_length / {split} = {tokens}, to be a multiple of {multiple}")


def _validate_reference(c: TrainConfig, source: str) -> None:
    r, d = c.reference, c.data
    _choice(r.mode, ("colocated", "cache", "base", "none"), source, "reference.mode")
    _require(r.mode != "base" or c.lora.rank > 0, source, "reference.mode",
             "base (the policy with its adapters off) needs LoRA (lora.rank > 0)")
    _choice(r.precision, DTYPES + ("fp8",), source, "reference.precision")
    if r.micro_batch_size is not None:
        _require(r.micro_batch_size >= 1 and r.micro_batch_size % d.micro_batch_size == 0, source,
                 "reference.micro_batch_size", f"must be a multiple of data.micro_batch_size {d.micro_batch_size}")
    if REF_LOGITS in LOSSES[c.loss.name].reads:  # the reference's final hidden states, per policy micro-batch
        _require(r.mode in ("colocated", "base"), source, "reference.mode",
                 f"loss {c.loss.name} reads the reference's whole distribution: colocated (or base with LoRA)")
        _require(r.micro_batch_size in (None, d.micro_batch_size), source, "reference.micro_batch_size",
                 f"loss {c.loss.name} keeps the reference's hidden states per policy micro-batch: leave it unset")
        _require(not r.offload, source, "reference.offload",
                 f"loss {c.loss.name} uses the reference's output layer in the policy's loss: keep it on the device")
    if r.mode == "cache":
        _require(LOSSES[c.loss.name].reads <= {REF_SUMS}, source, "reference.mode",
                 f"cache holds per-sample sums; loss {c.loss.name} reads the reference's per-token log-probs "
                 "(use colocated, or base with LoRA)")
        _require(r.cache is not None, source, "reference.cache", "is required with reference.mode: cache")
        _require(os.path.isfile(r.cache), source, "reference.cache", f"{r.cache}: no such file")
    _require(r.mode == "none" or c.model.moe_capacity_factor is None, source, "model.moe_capacity_factor",
             "drops tokens by how samples are grouped, so a reference's log-probs would depend on its micro-batches "
             "(step-1 weights not 1); use dropless routing (null) with a reference")
    if r.mode == "none":
        _require(not LOSSES[c.loss.name].needs_reference, source, "reference.mode",
                 f"loss {c.loss.name} needs a reference (colocated or cache)")


KEEP_BEST_METRICS = {"nll_per_token": "lowest", "loss": "lowest", "accuracy": "highest"}
"""The held-out figures checkpoint.keep_best can select by, and which value is best."""


def valid_sets(c: TrainConfig) -> dict[str, str]:
    """data.valid as {NAME: PREFIX} (one PREFIX is named `valid`); {} without evaluation."""
    v = c.data.valid
    return {} if v is None else {"valid": v} if isinstance(v, str) else dict(v)


def _validate_eval(c: TrainConfig, source: str) -> None:
    lg, sets = c.logging, valid_sets(c)
    _require(c.data.valid != {}, source, "data.valid", "names no set (leave it out for no evaluation)")
    for name, prefix in sets.items():
        key = "data.valid" if isinstance(c.data.valid, str) else f"data.valid.{name}"
        _require(bool(name) and "/" not in name and name == name.strip(), source, key,
                 "a set's name must be non-empty, without '/' or surrounding spaces")
        _require(os.path.isfile(f"{prefix}.json"), source, key,
                 f"{prefix}.json not found (run tools/preprocess_sft_data.py first)")
    _require(lg.eval_interval is None or lg.eval_interval >= 1, source, "logging.eval_interval", "must be at least 1")
    _require(lg.eval_samples is None or lg.eval_samples >= 1, source, "logging.eval_samples", "must be at least 1")
    _require(lg.eval_generate >= 0, source, "logging.eval_generate", "must be >= 0 (0: never)")
    _require(lg.eval_max_new_tokens >= 1, source, "logging.eval_max_new_tokens", "must be at least 1")
    if lg.eval_generate:
        p = c.parallel
        _require(bool(sets), source, "logging.eval_generate", "needs data.valid")
        _require(p.pp == 1 and p.cp == 1 and not p.sp, source, "logging.eval_generate",
                 f"greedy decoding runs whole prompts on each rank: needs parallel.pp 1, cp 1 and sp false (here "
                 f"pp {p.pp}, cp {p.cp}, sp {str(p.sp).lower()})")
    _validate_keep_best(c, source, sets)


def _validate_keep_best(c: TrainConfig, source: str, sets: dict) -> None:
    best, ck, lg = c.checkpoint.keep_best, c.checkpoint, c.logging
    if best is None:
        return
    name, _, metric = best.partition("/")
    _require(name in sets, source, "checkpoint.keep_best",
             f"{best!r}: SET/METRIC with SET one of data.valid ({', '.join(sets) or 'none given'})")
    _require(metric in KEEP_BEST_METRICS, source, "checkpoint.keep_best",
             f"{best!r}: METRIC must be one of {', '.join(KEEP_BEST_METRICS)}")
    _require(metric != "accuracy" or lg.eval_generate == 1, source, "checkpoint.keep_best",
             "by accuracy needs logging.eval_generate: 1 (accuracy at every evaluation)")
    _require(ck.interval > 0 and lg.eval_interval is not None and ck.interval % lg.eval_interval == 0, source,
             "checkpoint.interval", f"keep_best compares the checkpoints saved right after an evaluation: set "
             f"checkpoint.interval to a multiple of logging.eval_interval ({lg.eval_interval})")


def _validate_checkpoint_and_run(c: TrainConfig, source: str) -> None:
    ck = c.checkpoint
    _require(ck.interval >= 0, source, "checkpoint.interval", "must be >= 0")
    _require(ck.keep is None or ck.keep >= 1, source, "checkpoint.keep", "must be at least 1")
    _choice(ck.optimizer_sharding, OPTIMIZER_SHARDINGS, source, "checkpoint.optimizer_sharding")
    if ck.init is not None:
        _require(os.path.isdir(ck.init), source, "checkpoint.init", f"{ck.init}: no such directory")
    _require(c.logging.interval >= 1, source, "logging.interval", "must be at least 1")
    _require(c.train_steps is None or c.train_steps >= 1, source, "train_steps", "must be at least 1")
    _require(c.stop_at_step is None or c.stop_at_step >= 1, source, "stop_at_step", "must be at least 1")
    _require(c.stop_at_step is None or c.checkpoint.save_final, source, "checkpoint.save_final",
             "false with stop_at_step would stop without saving where the next invocation resumes")
    _choice(c.device, (None, "cuda", "cpu"), source, "device")
    _require(bool(c.output_dir), source, "output_dir", "is required")
    _require(not os.path.isfile(c.output_dir), source, "output_dir", f"{c.output_dir} is a file")
    _require(ck.save is None or not os.path.isfile(ck.save), source, "checkpoint.save", f"{ck.save} is a file")


def _validate_lora(c: TrainConfig, source: str) -> None:
    from minorsft_megatron.lora import config_sites

    lo, m = c.lora, c.model
    _require(lo.rank >= 0, source, "lora.rank", "must be >= 0 (0: no LoRA)")
    if lo.rank == 0:
        return
    _require(lo.alpha > 0, source, "lora.alpha", "must be positive")
    _require(0 <= lo.dropout < 1, source, "lora.dropout", f"{lo.dropout} must be in [0, 1)")
    sites = {s.path: s for layer in range(m.num_layers) for s in config_sites(m, layer)}
    for i, target in enumerate(lo.target_modules):
        _require(target in LORA_TARGETS, source, f"lora.target_modules[{i}]",
                 f"{target!r} is not a linear of the model (one of {', '.join(LORA_TARGETS)})")
        _require(any(s.selected_by([target]) for s in sites.values()), source, f"lora.target_modules[{i}]",
                 f"{target!r}: the model has no such linear (it has {', '.join(sorted(sites))})")
    _require(bool(lo.target_modules) and len(set(lo.target_modules)) == len(lo.target_modules), source,
             "lora.target_modules", "must name each target once, at least one")
    adapted = [s for s in sites.values() if s.selected_by(lo.target_modules)]
    smallest = min(min(_linear_shape(m, s)) for s in adapted)
    _require(lo.rank <= smallest, source, "lora.rank",
             f"{lo.rank} is larger than the model's smallest adapted dimension ({smallest})")
    etp, routed = c.parallel.etp or c.parallel.tp, any(s.block == "mlp.experts" for s in adapted)
    _require(not routed or etp in (1, c.parallel.tp), source,
             "parallel.etp", f"{etp} must be 1 or parallel.tp ({c.parallel.tp}) with adapters on the routed experts "
             "(megatron-core reduces their replicated gradients over the TP group)")
    _require(not routed or etp == c.parallel.tp or c.parallel.ep > 1, source, "parallel.etp",
             f"1 below parallel.tp ({c.parallel.tp}) needs parallel.ep > 1 with adapters on the routed experts (at EP "
             "1 megatron-core leaves the experts' communication to TP, which the expert adapters are not laid out for)")
    _require(c.precision.fp8 is None, source, "precision.fp8",
             "LoRA with FP8 is not built (the adapters would need FP8 weights)")


def _linear_shape(m: ModelConfig, site) -> tuple[int, int]:
    """(out, in) of the smallest part of a lora.Site's linear in a ModelConfig."""
    d = m.kv_channels or m.hidden_size // m.num_attention_heads
    if site.target == "linear_qkv":
        return _query_groups(m) * d, m.hidden_size
    if site.target == "linear_proj":
        return m.hidden_size, m.num_attention_heads * d
    ffn = {"mlp": m.ffn_hidden_size, "mlp.shared_experts": m.moe_shared_expert_ffn_hidden_size,
           "mlp.experts": m.moe_ffn_hidden_size or m.ffn_hidden_size}[site.block]
    return (ffn, m.hidden_size) if site.target == "linear_fc1" else (m.hidden_size, ffn)


SECTION_CHECKS = (_validate_model, _validate_parallel, _validate_moe, _validate_precision_and_loss, _validate_optimizer,
                  _validate_data, _validate_lora, _validate_reference, _validate_checkpoint_and_run, _validate_eval)
"""validate() runs these in order; each raises ConfigError naming the first key that is wrong."""


def validate(c: TrainConfig, source: str = "config", world_size: int | None = None) -> None:
    """Checks that need no model and no data beyond file existence (and the defaults that depend on other keys)."""
    if c.reference.mode is None:
        c.reference.mode = "base" if c.lora.rank > 0 else "colocated"
    for check in SECTION_CHECKS:
        check(c, source)
    if world_size is not None:
        _validate_layout(c, source, world_size)


def _validate_layout(c: TrainConfig, source: str, world_size: int) -> None:
    """What the job's `world_size` processes decide: the layout, and whole global batches per step."""
    from minorsft_megatron.parallel import LayoutError, check_layout

    p, d = c.parallel, c.data
    try:
        check_layout(world_size, p.tp, p.pp, p.cp, p.ep, p.etp or p.tp)
    except LayoutError as err:
        raise ConfigError(f"{source}: parallel: {err}")
    dp = world_size // (p.tp * p.pp * p.cp)
    divisor = dp if d.packing else dp * d.micro_batch_size
    _require(d.global_batch_size % divisor == 0, source, "data.global_batch_size",
             f"{d.global_batch_size} is not a multiple of " + ("the data-parallel size" if d.packing else
             "data.micro_batch_size x the data-parallel size") + f" ({divisor}, {world_size} processes)")


def check_for_device(c: TrainConfig, source: str, device_type: str) -> None:
    """What this device cannot do: FP8 without a suitable GPU and Transformer Engine (policy or reference), the
    Transformer Engine layer spec without a GPU, context parallelism on the local spec (`auto` resolves to it
    where TE is absent), packing on a TE too old for THD."""
    from minorsft_megatron import transformer_engine

    roles = [("policy", None)] + ([("reference", "reference FP8")] if c.reference.mode == "colocated" else [])
    try:
        for role, what in roles:
            p = transformer_engine.role_precision(c, role)
            transformer_engine.check_fp8(p.fp8, device_type, p.fp8_recipe, what=what)
        if device_type != "cuda":
            _require(c.model.spec != "te", source, "model.spec", "te (Transformer Engine) needs a GPU; use local or auto")
        spec = transformer_engine.resolve_spec(c.model.spec, device_type)
        _require(c.model.num_experts is None or spec == "local", source, "model.spec",
                 f"{c.model.spec} resolves to te here: mixture-of-experts layers are tested on the local spec only "
                 "(SequentialMLP; TE's grouped GEMM has had no GPU run yet); set model.spec: local")
        _require(c.lora.rank == 0 or spec == "local", source, "model.spec",
                 f"{c.model.spec} resolves to te here: LoRA adapters are built on the local spec only "
                 "(TE's fused norm-linears do not expose the normed input); set model.spec: local")
        transformer_engine.check_context_parallel_and_packing(c.parallel.cp, c.data.packing, spec)
    except transformer_engine.TransformerEngineError as err:
        key, _, message = str(err).partition(": ")
        if key.replace("_", "").replace(".", "").isalnum() and "." in key:  # "section.key: what" -> where it was set
            raise ConfigError(f"{_where(source, key)}: {message}")
        raise ConfigError(f"{source}: {err}")


def main(argv=None) -> int:
    """`python -m minorsft_megatron.config --config FILE [key=value ...]`: check a config before launching."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m minorsft_megatron.config", description=main.__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--world-size", type=int, default=None, help="the job's processes: also check the layout")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    from minorsft_megatron.compat import check_megatron_version
    from minorsft_megatron.device import resolve_device
    from minorsft_megatron.errors import UserError

    try:
        check_megatron_version()
        config = load_config(args.config, args.overrides)
        if args.world_size is not None:
            validate(config, Source.of(args.config, args.overrides), args.world_size)
        check_for_device(config, Source.of(args.config, args.overrides), resolve_device(config.device).type)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
