"""One step's parameter gradients of sft, sft_seq and minor_sft against an independent reference: a Hugging Face
`transformers` Llama holding the same (converted) weights, in float64, with each loss written out here.

The layout tests elsewhere compare layouts with each other; this one compares every layout with code that shares
nothing with the package's loss, log-prob, normalisation or schedule code, so an error common to all layouts (a
wrong global scale, a wrong loss) cannot pass.
"""

import subprocess
import sys

import pytest
import torch

from tests.convert_workers import make_hf_model
from tests.distributed import spawn
from tests.gpt_workers import SEQ, global_batch
from tests.tokenizers_for_tests import REPO

BETA = 0.04
MICRO_BATCH = 2
LOSSES = ("sft", "sft_seq", "minor_sft")
RTOL = 1e-5


def megatron_gradients(ckpt: str, tp: int, pp: int, batch: dict) -> dict:
    """{loss: every parameter's gradient after finalize_model_grads, full (TP-gathered), by global name}."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from minorsft_megatron import checkpoint, parallel
    from minorsft_megatron.config import ParallelConfig, TrainConfig, from_dict
    from minorsft_megatron.device import setup_device
    from minorsft_megatron.forward_step import SFTLossFunction, forward_backward
    from minorsft_megatron.model import build_model, output_log_probs
    from minorsft_megatron.transformer_engine import RolePrecision
    from tests.gpt_workers import full_grads, micro_batches

    device = setup_device("cpu")
    pgs = parallel.initialize(device, tp=tp, pp=pp)
    state = checkpoint.read_state(ckpt)
    cfg = from_dict(TrainConfig, state["config"], ckpt)
    cfg.parallel = ParallelConfig(tp=tp, pp=pp)
    model, config = build_model(cfg, RolePrecision("fp32"), state["vocab_size"], device, initialize=False)
    checkpoint.load(ckpt, model)
    # the default: output layer and log-probs fused, chunk by chunk
    log_probs = output_log_probs(model, cfg.loss.logprob_chunk_size, state["vocab_size"], pgs.tp, False)
    config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    batches = micro_batches(batch, 0, 1, MICRO_BATCH, device)
    out = {"last_stage": parallel_state.is_pipeline_last_stage()}
    for loss in LOSSES:
        ddp.zero_grad_buffer()
        loss_fn = SFTLossFunction(loss, BETA, log_probs, cp_group=pgs.cp)
        forward_backward([ddp], batches, loss_fn, SEQ, MICRO_BATCH)
        out[loss] = full_grads(model, config, pgs.tp, tp)
    return out


def reference_loss(name: str, logp_sum, num_answer_tokens, ref_logp_sum):
    """The three losses over the global batch, written from their definitions (float64)."""
    valid = num_answer_tokens > 0
    logp, m, ref = logp_sum[valid], num_answer_tokens[valid], ref_logp_sum[valid]
    if name == "sft":  # token mean of the NLL
        return -logp.sum() / m.sum()
    if name == "sft_seq":  # the paper's raw SFT: mean over sequences of -(1/m) log pi(y|x)
        return -(logp / m).mean()
    weight = 2 * torch.sigmoid(-BETA * (logp.detach() - ref))  # MinorSFT, eq. 7
    return -(weight * logp / m).mean()


def transformers_gradients(hf_dir: str, batch: dict) -> dict:
    """{loss: {Hugging Face parameter name: float64 gradient}}."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    mask = batch["loss_mask"].double()
    grads = {}
    for name in LOSSES:
        model.zero_grad()
        logits = model(batch["tokens"]).logits  # [b, s, V] float64
        token_logp = logits.log_softmax(-1).gather(-1, batch["labels"][..., None])[..., 0]  # [b, s]
        loss = reference_loss(name, (token_logp * mask).sum(-1), mask.sum(-1), batch["ref_logp_sum"].double())
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    return grads


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("grads")
    hf = make_hf_model("llama", str(root / "hf"))
    subprocess.run([sys.executable, "tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", hf, "--out",
                    str(root / "megatron"), "--dtype", "fp32"], cwd=REPO, check=True, capture_output=True, timeout=300)
    batch = global_batch(seed=3, vocab=300)
    return hf, str(root / "megatron"), batch, transformers_gradients(hf, batch)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)], ids=["tp1pp1", "tp2pp2"])
def test_gradients_equal_transformers_with_the_loss_written_out(tmp_path, converted, tp, pp):
    from minorsft_megatron.config import ModelConfig
    from minorsft_megatron.convert import hf_from_megatron, read_hf_config, model_config_from_hf

    hf, ckpt, batch, expected = converted
    ranks = spawn(tp * pp, megatron_gradients, ckpt, tp, pp, batch, out_dir=tmp_path / "job", timeout=300)
    m: ModelConfig = model_config_from_hf(read_hf_config(hf))
    for loss in LOSSES:
        grads = {}
        for rank in ranks:  # each pipeline stage holds its own layers; TP ranks hold the same gathered ones
            grads.update(rank[loss])
        for name, want in expected[loss].items():
            got = hf_from_megatron(name, grads.__getitem__, m).double()
            assert want.norm() > 0, (loss, name)
            err = float((got - want).norm() / want.norm())
            assert err <= RTOL, (loss, name, err)
