"""One step's parameter gradients of every loss against an independent reference: a Hugging Face `transformers`
Llama holding the same (converted) weights, in float64, with each loss written out here (per-token losses from the
full logits), at (TP, PP, DP) = (1,1,1), (2,1,1) with SP, (1,2,1), (2,2,1), (1,1,2), and 1 against 4 micro-batches.

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
LOSSES = ("sft", "sft_seq", "minor_sft", "iw_sft", "dft", "iw_sft_token", "asft", "sft_kl")
KL = ("asft", "sft_kl")
"""Last: their reference is a second converted model (perturbed weights), scored through reference.score_into with
its final hidden states kept, and its ref_logp_sum then replaces the batch's."""
KL_COEF = 0.1
RTOL = 1e-5


def megatron_gradients(ckpt: str, ref_ckpt: str, tp: int, pp: int, sp: bool, micro_batch: int, batch: dict) -> dict:
    """{loss: every parameter's gradient after finalize_model_grads, full (TP-gathered), by global name}."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from minorsft_megatron import checkpoint, parallel
    from minorsft_megatron.config import ParallelConfig, TrainConfig, from_dict
    from minorsft_megatron.device import setup_device
    from minorsft_megatron.forward_step import LogProbCollector, SFTLossFunction, forward_backward
    from minorsft_megatron.reference import score_into
    from minorsft_megatron.model import build_model, output_log_probs
    from minorsft_megatron.transformer_engine import RolePrecision
    from tests.gpt_workers import full_grads, micro_batches

    device = setup_device("cpu")
    pgs = parallel.initialize(device, tp=tp, pp=pp)
    state = checkpoint.read_state(ckpt)
    cfg = from_dict(TrainConfig, state["config"], ckpt)
    cfg.parallel = ParallelConfig(tp=tp, pp=pp, sp=sp)
    model, config = build_model(cfg, RolePrecision("fp32"), state["vocab_size"], device, initialize=False)
    checkpoint.load(ckpt, model)
    # the default: output layer and log-probs fused, chunk by chunk
    log_probs = output_log_probs(model, cfg.loss.logprob_chunk_size, state["vocab_size"], pgs.tp, sp)
    config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    dp = parallel_state.get_data_parallel_world_size()
    batches = micro_batches(batch, parallel_state.get_data_parallel_rank(), dp, micro_batch, device)
    reference, _ = build_model(cfg, RolePrecision("fp32"), state["vocab_size"], device, initialize=False)
    checkpoint.load(ref_ckpt, reference)
    ref_head = output_log_probs(reference, cfg.loss.logprob_chunk_size, state["vocab_size"], pgs.tp, sp)
    out = {"last_stage": parallel_state.is_pipeline_last_stage()}
    for loss in LOSSES:
        if loss == KL[0]:
            score_into(batches, reference, LogProbCollector(ref_head, pgs.cp, keep_hidden=True), SEQ, micro_batch, 1)
        ddp.zero_grad_buffer()
        loss_fn = SFTLossFunction(loss, BETA, log_probs, pgs.cp, KL_COEF, ref_head)
        forward_backward([ddp], batches, loss_fn, SEQ, micro_batch)
        out[loss] = full_grads(model, config, pgs.tp, tp)
    return out


def reference_loss(name: str, token_logp, mask, ref_logp_sum, ref_token_logp, kl):
    """Each loss over the global batch, written from its definition (float64): `token_logp` [b, s] every position's
    label log-prob, `mask` [b, s] the answer positions, `kl` [b, s] KL(pi_ref || pi_theta) over the vocabulary."""
    logp_sum, num_answer_tokens = (token_logp * mask).sum(-1), mask.sum(-1)
    valid = num_answer_tokens > 0
    logp, m, ref = logp_sum[valid], num_answer_tokens[valid], ref_logp_sum[valid]
    answer = mask.bool()
    if name == "sft":  # token mean of the NLL
        return -logp.sum() / m.sum()
    if name == "sft_seq":  # the paper's raw SFT: mean over sequences of -(1/m) log pi(y|x)
        return -(logp / m).mean()
    if name == "iw_sft":  # sequence weights clamp(exp(D / m), 0, 16) on the summed NLL, token mean
        return -(torch.exp((logp.detach() - ref) / m).clamp(max=16) * logp).sum() / m.sum()
    if name == "dft":  # sg(p_t) * -log p_t, token mean
        return -(token_logp.detach().exp() * token_logp)[answer].sum() / m.sum()
    if name == "asft":  # DFT's term plus lambda KL(pi_ref || pi_theta), token mean
        return (-(token_logp.detach().exp() * token_logp) + KL_COEF * kl)[answer].sum() / m.sum()
    if name == "sft_kl":  # NLL plus lambda KL(pi_ref || pi_theta), token mean
        return (-token_logp + KL_COEF * kl)[answer].sum() / m.sum()
    if name == "iw_sft_token":  # clamp(p_t / p_ref,t, 0.2, 1.8) * -log p_t, token mean
        weight = (token_logp.detach() - ref_token_logp).exp().clamp(0.2, 1.8)
        return -(weight * token_logp)[answer].sum() / m.sum()
    weight = 2 * torch.sigmoid(-BETA * (logp.detach() - ref))  # MinorSFT, eq. 7
    return -(weight * logp / m).mean()


def transformers_gradients(hf_dir: str, ref_dir: str, batch: dict) -> dict:
    """{loss: {Hugging Face parameter name: float64 gradient}}."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    with torch.no_grad():  # the KL losses' reference: its whole next-token distribution at every position
        log_r = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float64)(batch["tokens"]).logits.log_softmax(-1)
    mask = batch["loss_mask"].double()
    grads = {}
    for name in LOSSES:
        model.zero_grad()
        logits = model(batch["tokens"]).logits  # [b, s, V] float64
        log_p = logits.log_softmax(-1)
        token_logp = log_p.gather(-1, batch["labels"][..., None])[..., 0]  # [b, s]
        kl = (log_r.exp() * (log_r - log_p)).sum(-1)  # [b, s] KL(pi_ref || pi_theta), the full vocabulary
        loss = reference_loss(name, token_logp, mask, batch["ref_logp_sum"].double(),
                              batch["ref_token_logp"].double(), kl)
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    return grads


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("grads")
    hf = make_hf_model("llama", str(root / "hf"))
    ref = perturbed_copy(hf, str(root / "hf_ref"))
    for source, out in ((hf, "megatron"), (ref, "megatron_ref")):
        subprocess.run([sys.executable, "tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", source, "--out",
                        str(root / out), "--dtype", "fp32"], cwd=REPO, check=True, capture_output=True, timeout=300)
    batch = global_batch(seed=3, vocab=300)
    gen = torch.Generator().manual_seed(4)  # a reference's per-token log-probs: ratios p / p_ref around the clamps
    batch["ref_token_logp"] = -5.7 + torch.randn(batch["labels"].shape, generator=gen)
    return hf, str(root / "megatron"), str(root / "megatron_ref"), batch, transformers_gradients(hf, ref, batch)


def perturbed_copy(hf_dir: str, out: str) -> str:
    """The model at `hf_dir` with every weight moved a little (seeded): a reference that differs from the policy."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("tp,pp,dp,sp,micro_batch", [(1, 1, 1, False, 2), (1, 1, 1, False, 8), (2, 1, 1, True, 2),
                                                     (1, 2, 1, False, 2), (2, 2, 1, False, 2), (1, 1, 2, False, 2)],
                         ids=["tp1pp1", "one_micro_batch", "tp2sp", "pp2", "tp2pp2", "dp2"])
def test_gradients_equal_transformers_with_the_loss_written_out(tmp_path, converted, tp, pp, dp, sp, micro_batch):
    from minorsft_megatron.config import ModelConfig
    from minorsft_megatron.convert import hf_from_megatron, read_hf_config, model_config_from_hf

    hf, ckpt, ref_ckpt, batch, expected = converted
    ranks = spawn(tp * pp * dp, megatron_gradients, ckpt, ref_ckpt, tp, pp, sp, micro_batch, batch,
                  out_dir=tmp_path / "job", timeout=300)
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
