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


def test_fp8_refused_off_gpu():
    transformer_engine.check_fp8(None, "cpu")  # no FP8 asked: nothing to check
    with pytest.raises(RuntimeError, match=r"precision.fp8='e4m3' needs an NVIDIA GPU .* this run is on cpu"):
        transformer_engine.check_fp8("e4m3", "cpu")


@pytest.mark.skipif(transformer_engine.is_available(), reason="checks the refusal where TE is missing")
def test_te_spec_refused_without_transformer_engine():
    from minorsft_megatron.model import block_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)
    with pytest.raises(RuntimeError, match=r"layer spec \('te'\) needs Transformer Engine.*pip install \.\[te\]"):
        block_spec(config, "te")
    with pytest.raises(ValueError, match="layer spec must be 'local' or 'te', got 'fast'"):
        block_spec(config, "fast")
