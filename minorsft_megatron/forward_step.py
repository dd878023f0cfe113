"""The forward-step / loss-function pair that runs the losses inside megatron-core's pipeline schedules.

Normalisation follows megatron-core's per-token-loss contract (`config.calculate_per_token_loss=True`): each
micro-batch returns its loss SUM and its share of the denominator (sequences or answer tokens, as the loss
declares); the schedule adds the shares, `finalize_model_grads` all-reduces them over data- and
context-parallel ranks and divides every gradient once by the global total. The gradient is then exactly the
expectation over all sequences of the global batch, whatever the micro-batch size, number of micro-batches,
data-parallel size or packing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from minorsft_megatron.logprobs import (
    all_reduce,
    context_parallel_sum,
    sample_ids,
    sequence_sums,
    vocab_parallel_log_probs,
)
from minorsft_megatron.loss import LossSpec, get_loss, loss_and_stats, metrics_from_stats


@dataclass
class SFTBatch:
    """One micro-batch of `b` rows of `s` tokens holding `n` samples (`n = b` unless rows are packed)."""

    tokens: torch.Tensor
    """[b, s] input token ids."""
    labels: torch.Tensor
    """[b, s] next tokens: labels[:, t] = tokens[:, t + 1] within a sample."""
    loss_mask: torch.Tensor
    """[b, s] 1 where labels[:, t] is an answer token of the sample that position t belongs to."""
    position_ids: torch.Tensor
    """[b, s] positions, restarting at 0 for each packed sample."""
    attention_mask: torch.Tensor | None = None
    """[b, 1, s, s] bool, True where attention is blocked (packed rows on the local spec); None: causal."""
    cu_seqlens: torch.Tensor | None = None
    """[n + 1] int sample boundaries over the flattened [b * s] tokens for packed rows; None: one per row.
    No sample crosses a row; a row's trailing padding may belong to its last sample (its loss_mask is 0)."""
    ref_logp_sum: torch.Tensor | None = None
    """[n] float32 per-sample answer log-prob sums under the frozen reference."""
    sample_index: torch.Tensor | None = None
    """[n] int64 dataset index of each sample (what the reference cache is keyed by)."""

    def to(self, device: torch.device) -> "SFTBatch":
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}
        return SFTBatch(**moved)


def merge_micro_batches(batches: list[SFTBatch]) -> SFTBatch:
    """One micro-batch holding the rows of `batches` in order (for a forward-only pass at a larger size)."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]

    def cat(key):
        values = [getattr(b, key) for b in batches]
        return None if values[0] is None else torch.cat(values)

    cu_seqlens = None
    if first.cu_seqlens is not None:
        offsets, parts = 0, [first.cu_seqlens[:1]]
        for b in batches:
            parts.append(b.cu_seqlens[1:] + offsets)
            offsets += b.tokens.numel()
        cu_seqlens = torch.cat(parts)
    return SFTBatch(cat("tokens"), cat("labels"), cat("loss_mask"), cat("position_ids"), cat("attention_mask"),
                    cu_seqlens, cat("ref_logp_sum"), cat("sample_index"))


def packed_causal_mask(cu_seqlens: torch.Tensor, batch_size: int, seq_length: int) -> torch.Tensor:
    """[b, 1, s, s] bool attention mask for packed rows on the local spec: True where attention is blocked.

    Position t attends to positions <= t of its own sample only; trailing padding attends among itself.
    """
    ids = sample_ids(cu_seqlens, batch_size * seq_length).view(batch_size, seq_length)  # [b, s]
    same_sample = ids[:, :, None] == ids[:, None, :]  # [b, s, s]
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool, device=ids.device).tril()
    return ~(same_sample & causal).unsqueeze(1)


def sequence_log_probs(batch: SFTBatch, logits: torch.Tensor, vocab_size: int, tp_group, cp_group,
                       token_log_probs: list | None = None):
    """Per-sample answer log-prob sums and answer-token counts for one micro-batch.

    Args:
        logits: `[b, s, V/tp]` from GPTModel (this rank's vocabulary shard, this CP rank's part of s).
        token_log_probs: if a list, the detached per-token log-probs `[b, s]` (this CP rank's part) are appended.
    Returns:
        logp_sum `[n]` float32 (differentiable) and num_answer_tokens `[n]` int64, totals over the CP group.
        Collectives: 3 all-reduces over `tp_group`, 1 over `cp_group`.
    """
    token_logp = vocab_parallel_log_probs(logits, batch.labels, vocab_size, tp_group)  # [b, s]
    if token_log_probs is not None:
        token_log_probs.append(token_logp.detach())
    mask = batch.loss_mask.to(token_logp.dtype)  # [b, s]
    partial = torch.stack(
        [sequence_sums(token_logp, mask, batch.cu_seqlens), sequence_sums(mask, mask, batch.cu_seqlens)]
    )  # [2, n]
    logp_sum, num_tokens = context_parallel_sum(partial, cp_group).unbind()
    return logp_sum, num_tokens.round().to(torch.int64)


class SFTLossFunction:
    """The `loss_func` megatron-core's schedules call on the last pipeline stage, for one loss.

    Returns (loss_sum, denominator, stats): megatron-core adds the denominators of all micro-batches and
    divides the gradients by their global total. `stats` holds the detached "sum_stats" and "max_stats" for
    reduce_step_metrics, and this micro-batch's per-sample "logp_sum" and "num_answer_tokens" (the reference
    pass reads these, see collect_logp_sums). Within a context-parallel group every rank
    holds the whole per-sample sums; only CP rank 0 contributes the denominator and the statistics.
    """

    def __init__(self, loss: str | LossSpec, beta: float, vocab_size: int, tp_group=None, cp_group=None,
                 keep_token_log_probs: bool = False):
        self.spec = get_loss(loss) if isinstance(loss, str) else loss
        self.keep_token_log_probs = keep_token_log_probs
        """Also return the per-token log-probs `[b, s]` in the stats ("token_logp"): for scoring, not training."""
        self.beta = beta
        self.vocab_size = vocab_size
        self.tp_group = tp_group
        self.cp_group = cp_group
        self.counts_here = cp_group is None or dist.get_rank(cp_group) == 0

    def __call__(self, batch: SFTBatch, logits: torch.Tensor):
        token_logp = [] if self.keep_token_log_probs else None
        logp_sum, num_answer_tokens = sequence_log_probs(
            batch, logits, self.vocab_size, self.tp_group, self.cp_group, token_logp
        )
        loss_sum, denominator, sum_stats, max_stats = loss_and_stats(
            self.spec, logp_sum, batch.ref_logp_sum, num_answer_tokens, self.beta
        )
        if not self.counts_here:
            denominator, sum_stats = denominator * 0, sum_stats * 0
        stats = {
            "sum_stats": sum_stats,
            "max_stats": max_stats,
            "logp_sum": logp_sum.detach(),
            "num_answer_tokens": num_answer_tokens,
        }
        if token_logp is not None:
            stats["token_logp"] = token_logp[0]
        return loss_sum, denominator.to(torch.int), stats


def make_forward_step(loss_function: SFTLossFunction):
    """forward_step_func(data_iterator, model) for get_forward_backward_func(); iterator yields SFTBatch."""

    def forward_step(data_iterator, model):
        batch: SFTBatch = next(data_iterator)
        logits = model(batch.tokens, batch.position_ids, batch.attention_mask)  # [b, s, V/tp] (last stage)
        return logits, functools.partial(loss_function, batch)

    return forward_step


def collect_logp_sums(losses_reduced: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's per-sample logp_sum `[N]` and num_answer_tokens `[N]`, in micro-batch order."""
    return (
        torch.cat([d["logp_sum"] for d in losses_reduced]),
        torch.cat([d["num_answer_tokens"] for d in losses_reduced]),
    )


def check_schedule_config(config, forward_only: bool = False) -> None:
    """The model config settings the exact normalisation relies on (gradients only with `forward_only` False)."""
    if not config.calculate_per_token_loss:
        raise ValueError("set calculate_per_token_loss=True: the losses divide once by the global denominator")
    if not forward_only and config.finalize_model_grads_func is None:
        raise ValueError("set finalize_model_grads_func (megatron.core.distributed.finalize_model_grads)")


def reduce_step_metrics(losses_reduced: list[dict], dp_cp_group, has_reference: bool) -> dict:
    """One step's metrics from the per-micro-batch statistics of the last pipeline stage.

    Collectives: one all-reduce (sum) and one all-reduce (max) over `dp_cp_group`, once per step.
    Returns detached 0-d tensors (see loss.metrics_from_stats); call on last-stage ranks only.
    """
    sum_stats = torch.stack([d["sum_stats"] for d in losses_reduced]).sum(dim=0)
    max_stats = torch.stack([d["max_stats"] for d in losses_reduced]).amax(dim=0)
    all_reduce(sum_stats, dist.ReduceOp.SUM, dp_cp_group)
    all_reduce(max_stats, dist.ReduceOp.MAX, dp_cp_group)
    return metrics_from_stats(sum_stats, max_stats, has_reference)


def forward_backward(
    model: list,
    batches: list[SFTBatch],
    loss_function: SFTLossFunction,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
):
    """Run one global batch (this rank's micro-batches) through megatron-core's schedule for `model`.

    Returns the per-micro-batch statistics on the last pipeline stage (an empty list elsewhere).
    """
    check_schedule_config(model[0].config, forward_only)
    return get_forward_backward_func()(
        forward_step_func=make_forward_step(loss_function),
        data_iterator=iter(batches),
        model=model,
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
