"""The device module's choices and the Transformer Engine module's refusals, where TE cannot run."""

import pytest
import torch

from minorsft_megatron import transformer_engine
from minorsft_megatron.device import distributed_backend, resolve_device


def test_resolve_device(device):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert distributed_backend(torch.device("cpu")) == "gloo"
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no CUDA device is visible")
def test_cuda_requested_without_gpu():
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        resolve_device("cuda")


@pytest.mark.skipif(transformer_engine.is_available(), reason="checks the refusal where TE is missing")
def test_te_spec_refused_without_transformer_engine():
    from minorsft_megatron.model import block_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)
    with pytest.raises(transformer_engine.TransformerEngineError, match=r"layer spec \('te'\) needs Transformer Engine.*pip install \.\[te\]"):
        block_spec(config, "te")
    with pytest.raises(ValueError, match="layer spec must be 'local' or 'te', got 'fast'"):
        block_spec(config, "fast")


@pytest.mark.parametrize("args,message", [
    (("e4m3", "cpu"), "precision.fp8: 'e4m3' needs an NVIDIA GPU (compute capability >= 8.9) with Transformer Engine; "
                      "this run is on cpu"),
    (("e5m2", "cuda"), "precision.fp8: 'e5m2' is not one of hybrid, e4m3"),
    (("hybrid", "cuda", "fast"), "precision.fp8_recipe: 'fast' is not one of delayed, tensorwise, blockwise, mxfp8"),
    (("hybrid", "cuda", "mxfp8", (9, 0), "2.8.0"), "mxfp8 needs compute capability >= 10.0; this GPU has 9.0"),
    (("hybrid", "cuda", "delayed", (8, 0), "2.8.0"), "delayed needs compute capability >= 8.9; this GPU has 8.0"),
    (("e4m3", "cuda", "blockwise", (9, 0), "2.2.1"), "blockwise needs Transformer Engine >= 2.3.0; installed: 2.2.1"),
])
def test_fp8_refusals_say_which_and_why(args, message):
    with pytest.raises(transformer_engine.FP8Error) as err:
        transformer_engine.check_fp8(*args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_fp8_accepted_where_gpu_and_te_allow():
    transformer_engine.check_fp8(None, "cpu")  # no FP8 asked: nothing to check
    transformer_engine.check_fp8("hybrid", "cuda", "tensorwise", (9, 0), "2.8.0+cu13")
    transformer_engine.check_fp8("e4m3", "cuda", "mxfp8", (10, 0), "2.8.0")
    assert transformer_engine.resolve_spec("local", "cuda") == "local"
    assert transformer_engine.resolve_spec("auto", "cpu") == "local"


@pytest.mark.parametrize("recipe,scoring", [("delayed", "tensorwise"), ("tensorwise", "tensorwise"),
                                            ("blockwise", "blockwise"), ("mxfp8", "mxfp8")])
def test_forward_only_fp8_never_uses_delayed_scaling(tmp_path, recipe, scoring):
    """Delayed scaling makes a sample's reference log-prob depend on earlier micro-batches (and quantises FP8
    weights at scale 1): the reference and score use current scaling; the policy keeps its recipe."""
    from minorsft_megatron.config import TrainConfig

    cfg = TrainConfig()
    cfg.precision.fp8, cfg.precision.fp8_recipe = "hybrid", recipe
    cfg.reference.precision, cfg.reference.fp8_weights = "fp8", True
    assert transformer_engine.role_precision(cfg, "policy").fp8_recipe == recipe
    for role in ("reference", "score"):
        assert transformer_engine.role_precision(cfg, role).fp8_recipe == scoring
