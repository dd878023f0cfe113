"""The fused output layer + log-probs (chunk by chunk, no full-vocabulary logits) against today's path (the
output layer's logits, then vocab_parallel_log_probs), in fp32: values and gradients of the hidden states and
the output weight, and every parameter's gradient after one training step, at TP = 1, 2 and 2 with sequence
parallelism, PP = 2, tied and untied embeddings, a padded vocabulary, and chunk sizes that do and do not divide
the positions; plus the values against float64 written here.
"""

import pytest
import torch

from tests.distributed import spawn

RTOL = 1e-6
VOCAB, PADDED, HIDDEN = 50, 64, 24  # padded: the last TP = 2 shard is partly padding
ROWS, SEQ = 3, 8


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def op_inputs(vocab: int = VOCAB):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, SEQ, HIDDEN, generator=gen, dtype=torch.float64)
    weight = torch.randn(PADDED, HIDDEN, generator=gen, dtype=torch.float64) * 0.5
    weight[vocab:] = 3.0  # padding rows: large logits that must take no probability
    labels = torch.randint(0, vocab, (ROWS, SEQ), generator=gen)
    upstream = torch.randn(ROWS, SEQ, generator=gen, dtype=torch.float64)
    upstream[1, 2:5] = 0  # masked positions: no gradient
    return hidden, weight, labels, upstream


def op_worker(tp: int, sp: bool, chunk: int, hidden, weight, labels, upstream, vocab: int = VOCAB):
    """Today's path and the fused one on this rank's shards: log-probs and the gradients of this rank's hidden
    states (its sequence part under SP) and output-weight rows."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    from minorsft_megatron import parallel
    from minorsft_megatron.device import setup_device
    from minorsft_megatron.logprobs import fused_log_probs, vocab_parallel_log_probs

    pgs = parallel.initialize(setup_device("cpu"), tp=tp)
    rank = torch.distributed.get_rank(pgs.tp)
    w = weight.float().chunk(tp)[rank]
    h = hidden.float().chunk(tp, dim=1)[rank] if sp else hidden.float()
    out = {}
    for name in ("today", "fused"):
        h_in, w_in = h.clone().requires_grad_(), w.clone().requires_grad_()
        if name == "fused":
            logp = fused_log_probs(h_in, w_in, labels, vocab, pgs.tp, sp, chunk)
        else:  # the output layer: gather (SP) or copy into the TP region, matmul, then the log-probs
            x = h_in.transpose(0, 1)
            x = gather_from_sequence_parallel_region(x, True, group=pgs.tp) if sp and tp > 1 else \
                copy_to_tensor_model_parallel_region(x, group=pgs.tp)
            logits = (x @ w_in.t()).transpose(0, 1).contiguous()  # [b, s, V/tp], as GPTModel returns them
            logp = vocab_parallel_log_probs(logits, labels, vocab, pgs.tp)
        (logp * upstream.float()).sum().backward()
        out[name] = {"logp": logp.detach(), "hidden": h_in.grad, "weight": w_in.grad}
    out["first_row"] = rank * w.size(0)  # vocabulary id of this shard's first row
    return out


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "tp2sp"])
@pytest.mark.parametrize("chunk", [6, 8, 1024], ids=["chunk6", "chunk8", "chunk1024"])
def test_fused_op_equals_the_output_layer_then_log_probs(tmp_path, tp, sp, chunk, vocab=VOCAB):
    """24 positions: chunks of 6 and 8 divide them, 1024 is one chunk; SP splits the sequence of 8 over 2."""
    hidden, weight, labels, upstream = op_inputs(vocab)
    ranks = spawn(tp, op_worker, tp, sp, chunk, hidden, weight, labels, upstream, vocab, out_dir=tmp_path)
    expected = torch.log_softmax(hidden @ weight[:vocab].t(), -1).gather(-1, labels[..., None])[..., 0]
    for r in ranks:
        today, fused = r["today"], r["fused"]
        assert rel_err(fused["logp"].double(), expected) <= RTOL
        assert rel_err(fused["logp"], today["logp"]) <= RTOL
        assert rel_err(fused["hidden"], today["hidden"]) <= RTOL
        assert rel_err(fused["weight"], today["weight"]) <= RTOL
        padding = slice(max(vocab - r["first_row"], 0), None)  # this shard's padded rows get no gradient
        assert torch.all(fused["weight"][padding] == 0)
        real = today["weight"][:max(vocab - r["first_row"], 0)]  # none on a shard of padding only
        assert today["hidden"].norm() > 0 and (real.numel() == 0 or real.norm() > 0)


def test_a_shard_of_padding_only_takes_no_probability(tmp_path):
    """20 real tokens of 64 at TP = 2: the second rank's 32 rows are all padding (its max is -inf)."""
    test_fused_op_equals_the_output_layer_then_log_probs(tmp_path, 2, False, 8, vocab=20)


def test_chunks_that_do_not_divide_still_cover_every_position(tmp_path):
    """7 does not divide 24: the last chunk is short; every position's value and gradient is still there."""
    hidden, weight, labels, upstream = op_inputs()
    r = spawn(1, op_worker, 1, False, 7, hidden, weight, labels, upstream, out_dir=tmp_path)[0]
    assert rel_err(r["fused"]["logp"], r["today"]["logp"]) <= RTOL
    assert (r["fused"]["hidden"][1, 2:5] == 0).all() and (r["fused"]["hidden"].abs().sum(-1) > 0).sum() == 21


def step_worker(tp: int, pp: int, sp: bool, tied: bool, chunk: int):
    """One minor_sft step of the tiny GPTModel (tests/gpt_workers) with today's log-probs and with the fused ones:
    per-sample sums and every parameter's full gradient, both ways."""
    from megatron.core import parallel_state

    from minorsft_megatron import parallel
    from minorsft_megatron.device import setup_device
    from minorsft_megatron.forward_step import SFTLossFunction, forward_backward
    from minorsft_megatron.model import output_log_probs
    from tests.gpt_workers import SEQ as GPT_SEQ
    from tests.gpt_workers import VOCAB as GPT_VOCAB
    from tests.gpt_workers import build, collect_logp_sums, full_grads, global_batch, micro_batches

    device = setup_device("cpu")
    pgs = parallel.initialize(device, tp=tp, pp=pp)
    out = {}
    for name, chunk_size in (("today", 0), ("fused", chunk)):
        config, model, ddp = build(tp, pp, sp, device, tied=tied)
        log_probs = output_log_probs(model, chunk_size, GPT_VOCAB, pgs.tp, sp)
        batches = micro_batches(global_batch(), 0, 1, 4, device)
        ddp.zero_grad_buffer()
        stats = forward_backward([ddp], batches, SFTLossFunction("minor_sft", 0.04, log_probs, pgs.cp), GPT_SEQ, 4)
        out[name] = {"grads": full_grads(model, config, pgs.tp, tp)}
        if parallel_state.is_pipeline_last_stage():
            out[name]["logp_sum"] = collect_logp_sums(stats)[0]
    return out


@pytest.mark.parametrize("tp,pp,sp,tied,chunk", [
    (1, 1, False, False, 16), (2, 1, False, True, 24), (2, 1, True, False, 16), (1, 2, False, True, 24),
    (1, 2, False, False, 1024),
], ids=["tp1", "tp2-tied", "tp2sp", "pp2-tied", "pp2-one-chunk"])
def test_a_training_step_with_fused_log_probs_equals_todays(tmp_path, tp, pp, sp, tied, chunk):
    """64 positions per micro-batch: chunks of 16 divide them, 24 do not. Tied at PP = 2: the last stage's copy
    of the embedding, kept in step by megatron-core's embedding group."""
    ranks = spawn(tp * pp, step_worker, tp, pp, sp, tied, chunk, out_dir=tmp_path, timeout=300)
    for r in ranks:
        today, fused = r["today"], r["fused"]
        if "logp_sum" in today:
            assert rel_err(fused["logp_sum"], today["logp_sum"]) <= RTOL
        assert fused["grads"].keys() == today["grads"].keys()
        for name, grad in today["grads"].items():
            assert grad.norm() > 0, name
            assert rel_err(fused["grads"][name], grad) <= RTOL, (name, rel_err(fused["grads"][name], grad))


def test_bf16_weights_accumulate_into_an_fp32_main_grad_block_by_block(monkeypatch):
    """As in bf16 training: bf16 hidden states and weight, the weight gradient added into megatron-core DDP's fp32
    `main_grad` (which already holds a gradient) in vocabulary blocks; chunks of 7 and blocks of 40 rows leave a
    short last chunk and block. Against float64 from the same bf16 values, within bf16's rounding of the logits
    (the matmul's output is bf16, as the output layer's is)."""
    from minorsft_megatron import logprobs

    monkeypatch.setattr(logprobs, "WGRAD_BLOCK", 40)
    hidden, weight, labels, upstream = op_inputs()
    h16, w16 = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    before = torch.randn(PADDED, HIDDEN, generator=torch.Generator().manual_seed(1))
    w16.main_grad, w16.grad_added_to_main_grad = before.clone(), False
    logp = logprobs.fused_log_probs(h16, w16, labels, VOCAB, chunk_size=7)
    (logp * upstream.float()).sum().backward()
    assert w16.grad_added_to_main_grad and w16.main_grad.dtype == torch.float32

    h64, w64 = h16.detach().double().requires_grad_(), w16.detach().double().requires_grad_()
    expected = torch.log_softmax(h64 @ w64[:VOCAB].t(), -1).gather(-1, labels[..., None])[..., 0]
    (expected * upstream).sum().backward()
    assert rel_err(logp.detach().double(), expected.detach()) <= 1e-2
    assert rel_err(h16.grad.double(), h64.grad) <= 2e-2
    assert rel_err(w16.main_grad.double() - before.double(), w64.grad) <= 2e-2
    assert torch.equal(w16.main_grad[VOCAB:], before[VOCAB:])  # padding rows: nothing added
