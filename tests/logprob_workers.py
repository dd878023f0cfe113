"""Worker bodies for the vocab-parallel and context-parallel log-prob tests."""

from __future__ import annotations

import torch

from minorsft_megatron import parallel
from minorsft_megatron.device import setup_device
from minorsft_megatron.data.batch import SFTBatch
from minorsft_megatron.forward_step import SFTLossFunction
from minorsft_megatron.logprobs import OutputLogProbs, context_parallel_sum, sequence_sums, vocab_parallel_log_probs


def vocab_parallel(tp: int, device_name: str, logits: torch.Tensor, labels, upstream, vocab_size, dtype):
    """This rank's shard of `logits` [s, b, V_padded]; returns full log-probs and this shard's gradient."""
    device = setup_device(device_name)
    pgs = parallel.initialize(device, tp=tp)
    rank = torch.distributed.get_rank(pgs.tp)
    shard = logits.chunk(tp, dim=-1)[rank].to(device=device, dtype=dtype).requires_grad_()
    logp = vocab_parallel_log_probs(shard, labels.to(device), vocab_size, pgs.tp)
    (logp * upstream.to(device)).sum().backward()
    return {"rank": rank, "logp": logp.detach().cpu(), "grad": shard.grad.cpu(), "grad_dtype": shard.grad.dtype}


def cp_chunks(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """Megatron's load-balanced split: 2*cp chunks, rank r holds chunks r and 2*cp - 1 - r."""
    chunks = torch.arange(seq_len).chunk(2 * cp)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]])


def context_parallel(cp: int, device_name: str, batch: dict, logits: torch.Tensor, loss: str):
    """One CP rank's part of the sequence: per-sample sums, loss, denominator and the local logits' gradient."""
    device = setup_device(device_name)
    pgs = parallel.initialize(device, cp=cp)
    rank = torch.distributed.get_rank(pgs.cp)
    positions = cp_chunks(logits.size(1), cp, rank)
    local = {k: (v[:, positions] if k != "ref_logp_sum" else v).to(device) for k, v in batch.items()}
    local_logits = logits[:, positions].to(device).requires_grad_()  # [b, s/cp, V]
    mb = SFTBatch(position_ids=None, **local)
    loss_fn = SFTLossFunction(loss, 0.04, OutputLogProbs(logits.size(-1), pgs.tp), cp_group=pgs.cp)
    loss_sum, denominator, stats = loss_fn(mb, local_logits)
    loss_sum.backward()
    plain_sums = context_parallel_sum(
        sequence_sums(torch.ones_like(local["loss_mask"]), local["loss_mask"], mb.position_sample_ids(), mb.num_samples),
        pgs.cp,
    )
    return {
        "positions": positions,
        "grad": local_logits.grad.cpu(),
        "loss_sum": loss_sum.detach().cpu(),
        "denominator": int(denominator),
        "logp_sum": stats["logp_sum"].cpu(),
        "num_answer_tokens": stats["num_answer_tokens"].cpu(),
        "plain_counts": plain_sums.cpu(),
    }
