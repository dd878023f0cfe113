"""The one module that owns Transformer Engine (an optional extra: `pip install .[te]`) and FP8.

Nothing else in the package imports transformer_engine; it asks here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from minorsft_megatron.errors import UserError


class TransformerEngineError(UserError):
    """Something this machine or this Transformer Engine cannot run; one line saying which and why."""


def is_available() -> bool:
    """True when Transformer Engine's PyTorch bindings can be imported."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def require(feature: str) -> None:
    """A one-line error (TransformerEngineError) when `feature` needs Transformer Engine and it cannot be imported."""
    if not is_available():
        raise TransformerEngineError(
            f"{feature} needs Transformer Engine, which cannot be imported here: install the extra "
            "(`pip install .[te]`) on a machine with an NVIDIA GPU and the CUDA toolkit"
        )


FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
# (minimum compute capability, minimum Transformer Engine version) per recipe, as megatron-core 0.16's
# fp8_utils and Transformer Engine require them: FP8 at all needs Ada/Hopper (8.9); MXFP8 needs Blackwell.
RECIPE_NEEDS = {
    "delayed": ((8, 9), "2.1.0"),
    "tensorwise": ((8, 9), "2.2.0"),
    "blockwise": ((9, 0), "2.3.0"),
    "mxfp8": ((10, 0), "2.1.0"),
}


FP8_TOKEN_MULTIPLE = {"delayed": 16, "tensorwise": 16, "blockwise": 32, "mxfp8": 32}
"""FP8 GEMMs need the number of tokens they multiply (per rank) divisible by this, per recipe."""
THD_MIN_VERSION = "1.10.0"
"""Packed (THD) sequences split for context parallelism: megatron-core asks Transformer Engine >= 1.10."""


class FP8Error(TransformerEngineError):
    """An FP8 choice this machine or this Transformer Engine cannot run; one line saying which and why."""


def installed_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("transformer-engine")
    except Exception:  # noqa: BLE001 - any failure means: no usable version information
        return None


def _version_tuple(text: str) -> tuple:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3] if part.isdigit())


@dataclass(frozen=True)
class RolePrecision:
    """How one model of a run computes: its dtype and, through Transformer Engine, FP8."""

    dtype: str
    """bf16, fp16 or fp32: the parameters, and the compute outside FP8 GEMMs."""
    fp8: str | None = None
    """FP8 format of the GEMMs (hybrid or e4m3); None: no FP8."""
    fp8_recipe: str = "delayed"
    """FP8 scaling recipe (FP8_RECIPES)."""
    fp8_param: bool = False
    """Keep the weights themselves in FP8 (Transformer Engine FP8 parameters)."""


def role_precision(cfg, role: str, precision: str | None = None) -> RolePrecision:
    """The precision of the model playing `role` in a run configured by `cfg` (config.TrainConfig).

    policy: precision.dtype, with precision.fp8. reference: reference.precision, where "fp8" means bf16 weights
    with FP8 compute in the policy's format (e4m3 when the policy has none) and the policy's recipe, except that
    delayed scaling becomes current scaling (scoring_recipe), and reference.fp8_weights. score: as the reference,
    at `precision` (default reference.precision), never with FP8 weights.
    """
    if role == "policy":
        return RolePrecision(cfg.precision.dtype, cfg.precision.fp8, cfg.precision.fp8_recipe)
    if role not in ("reference", "score"):
        raise ValueError(f"role must be policy, reference or score, got {role!r}")
    precision = precision or cfg.reference.precision
    fp8_param = role == "reference" and cfg.reference.fp8_weights
    fp8 = (cfg.precision.fp8 or "e4m3") if precision == "fp8" or fp8_param else None
    return RolePrecision("bf16" if precision == "fp8" else precision, fp8, scoring_recipe(cfg.precision.fp8_recipe),
                         fp8_param)


def scoring_recipe(recipe: str) -> str:
    """The FP8 recipe of a forward-only model (reference, score) for a policy trained with `recipe`: `delayed`
    scales each tensor by amaxes of earlier micro-batches (scale 1 at the first), so a sample's log-prob would
    depend on batch order and on the reference's micro-batch size, and FP8 weights would be quantised at scale 1.
    Current scaling (`tensorwise`) scales by the tensor itself; the block recipes already do."""
    return "tensorwise" if recipe == "delayed" else recipe


def check_fp8(fp8: str | None, device_type: str, recipe: str = "delayed", capability=None,
              te_version: str | None = None, what: str | None = None) -> None:
    """Refuse an FP8 format/recipe that cannot run here: no CUDA device, no Transformer Engine, a GPU too old for
    the recipe, or a Transformer Engine too old for it. `capability` and `te_version` default to this machine's;
    `what` names the request in the message (default: precision.fp8 and its value)."""
    if fp8 is None:
        return
    what = what or f"precision.fp8: {fp8!r}"
    if fp8 not in FP8_FORMATS:
        raise FP8Error(f"precision.fp8: {fp8!r} is not one of {', '.join(FP8_FORMATS)} (or null)")
    if recipe not in FP8_RECIPES:
        raise FP8Error(f"precision.fp8_recipe: {recipe!r} is not one of {', '.join(FP8_RECIPES)}")
    if device_type != "cuda":
        raise FP8Error(f"{what} needs an NVIDIA GPU (compute capability >= 8.9) with Transformer "
                       f"Engine; this run is on {device_type}")
    if te_version is None:
        if not is_available():
            raise FP8Error(f"{what} needs Transformer Engine, which cannot be imported here: install "
                           "the extra (`pip install .[te]`)")
        te_version = installed_version() or "0"
    if capability is None:
        import torch

        capability = torch.cuda.get_device_capability()
    need_cc, need_te = RECIPE_NEEDS[recipe]
    named = f"precision.fp8_recipe: {recipe}" if what is None or what.startswith("precision.") else \
        f"{what} ({recipe} scaling)"
    if tuple(capability) < need_cc:
        raise FP8Error(f"{named} needs compute capability >= {need_cc[0]}.{need_cc[1]}; "
                       f"this GPU has {capability[0]}.{capability[1]}")
    if _version_tuple(te_version) < _version_tuple(need_te):
        raise FP8Error(f"{named} needs Transformer Engine >= {need_te}; installed: {te_version}")


def fp8_token_multiple(cfg) -> int:
    """The multiple FP8 GEMMs need of their token count in a run configured by `cfg` (config.TrainConfig): the
    recipe's when the policy or a co-located reference computes in FP8, else 1."""
    roles = ["policy"] + (["reference"] if cfg.reference.mode == "colocated" else [])
    if all(role_precision(cfg, role).fp8 is None for role in roles):
        return 1
    return FP8_TOKEN_MULTIPLE[cfg.precision.fp8_recipe]


def check_context_parallel_and_packing(cp: int, packing: bool, spec: str, te_version: str | None = None) -> None:
    """Refuse what the resolved layer spec `spec` cannot run: context parallelism needs Transformer Engine's
    attention (the local spec's would attend within each rank's chunks only), and packed samples on the TE spec
    run as THD sequences split per sequence, which needs TE >= THD_MIN_VERSION."""
    if cp > 1 and spec != "te":
        raise TransformerEngineError(
            f"parallel.cp: context parallelism needs the Transformer Engine layer spec (its attention exchanges keys "
            f"and values between CP ranks); the layer spec here is {spec}")
    if packing and spec == "te":
        version = te_version or installed_version() or "0"
        if _version_tuple(version) < _version_tuple(THD_MIN_VERSION):
            raise TransformerEngineError(
                f"data.packing: packed samples on the Transformer Engine spec run as THD sequences, which need "
                f"Transformer Engine >= {THD_MIN_VERSION}; installed: {version}")


def resolve_spec(spec: str, device_type: str) -> str:
    """'auto': the Transformer Engine spec on a GPU where it imports, else the local spec; 'te' must be usable."""
    if spec == "auto":
        return "te" if device_type == "cuda" and is_available() else "local"
    if spec == "te":
        require("the Transformer Engine layer spec ('te')")
    return spec


def layer_spec(config, qk_layernorm: bool = False):
    """megatron-core's Transformer Engine GPT layer spec (fused layer-norm + linear)."""
    require("the Transformer Engine layer spec ('te')")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
