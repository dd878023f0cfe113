"""The one module that owns Transformer Engine (an optional extra: `pip install .[te]`) and FP8.

Nothing else in the package imports transformer_engine; it asks here.
"""

from __future__ import annotations

import importlib.util


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
    """A one-line error when `feature` needs Transformer Engine and it cannot be imported here."""
    if not is_available():
        raise RuntimeError(
            f"{feature} needs Transformer Engine, which cannot be imported here: install the extra "
            "(`pip install .[te]`) on a machine with an NVIDIA GPU and the CUDA toolkit"
        )


def check_fp8(fp8: str | None, device_type: str) -> None:
    """Refuse FP8 where it cannot run: no CUDA device, or no Transformer Engine."""
    if fp8 is None:
        return
    if device_type != "cuda":
        raise RuntimeError(f"precision.fp8={fp8!r} needs an NVIDIA GPU (Hopper or newer); this run is on {device_type}")
    require(f"precision.fp8={fp8!r}")


def layer_spec(config, qk_layernorm: bool = False):
    """megatron-core's Transformer Engine GPT layer spec (fused layer-norm + linear)."""
    require("the Transformer Engine layer spec ('te')")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
