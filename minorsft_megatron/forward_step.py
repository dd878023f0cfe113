"""The adapter between this package's losses and megatron-core's pipeline schedules.

Training: `SFTLossFunction` is the `loss_func` the schedules call on the last pipeline stage. Normalisation
follows megatron-core's per-token-loss contract (`config.calculate_per_token_loss=True`): each micro-batch
returns its loss SUM and its share of the denominator (sequences or answer tokens, as the loss declares); the
schedule adds the shares, `finalize_model_grads` all-reduces them over data- and context-parallel ranks and
divides every gradient once by the global total. The gradient is then exactly the expectation over all
sequences of the global batch, whatever the micro-batch size, number of micro-batches, data-parallel size or
packing.

Scoring (the co-located reference, `score`): `LogProbCollector` is a forward-only pass's non-loss-data
function; it computes no loss and returns each micro-batch's `SequenceLogProbs`.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from minorsft_megatron.data.batch import SFTBatch, context_parallel_share
from minorsft_megatron.logprobs import (
    OutputLogProbs,
    SequenceLogProbs,
    all_reduce,
    answer_sums,
    concat_log_probs,
    sequence_log_probs,
)
from minorsft_megatron.loss import REF_LOGITS, REF_TOKENS, LossSpec, get_loss, loss_and_stats, metrics_from_stats
from minorsft_megatron.model import forward_kwargs, unwrap


class SFTLossFunction:
    """The `loss_func` megatron-core's schedules call on the last pipeline stage, for one loss.

    Returns (loss_sum, denominator, stats): megatron-core adds the denominators of all micro-batches and
    divides the gradients by their global total. `stats` holds the detached "sum_stats" and "max_stats" for
    reduce_step_metrics, and this micro-batch's per-sample "logp_sum" and "num_answer_tokens". Within a
    context-parallel group every rank holds the whole per-sample sums; only CP rank 0 contributes the
    denominator and the statistics.
    """

    def __init__(self, loss: str | LossSpec, beta: float, log_probs: OutputLogProbs, cp_group=None,
                 kl_coef: float = 0.1, reference_log_probs: OutputLogProbs | None = None):
        self.spec = get_loss(loss) if isinstance(loss, str) else loss
        self.beta, self.kl_coef = beta, kl_coef
        self.reference_log_probs = reference_log_probs
        """The reference's output head (its weight), for the losses reading REF_LOGITS (batch.ref_hidden)."""
        self.log_probs = log_probs
        """How the model's output becomes label log-probs (from logits, or fused from hidden states)."""
        self.cp_group = cp_group
        self.counts_here = cp_group is None or dist.get_rank(cp_group) == 0

    def __call__(self, batch: SFTBatch, output: torch.Tensor):
        token_logp, kl = self._token_log_probs(batch, output)  # [b, s] each, differentiable (kl: or None)
        values = [token_logp, torch.ones_like(token_logp), token_logp.detach().exp()]  # log p_t, 1, p_t
        if kl is not None:
            values.append(kl.detach())
        if self.spec.level == "token":
            if REF_TOKENS in self.spec.reads and batch.ref_token_logp is None:
                raise ValueError("this loss reads the reference's per-token log-probs: the micro-batch has none")
            values.append(self.spec.fn(token_logp, batch.ref_token_logp, kl, self.beta, self.kl_coef))  # [b, s]
        sums = answer_sums(batch, values, self.cp_group)  # [3 to 5, n]
        logp_sum, num_answer_tokens = sums[0], sums[1].detach().round().to(torch.int64)
        loss_sum, denominator, sum_stats, max_stats = loss_and_stats(
            self.spec, logp_sum, batch.ref_logp_sum, num_answer_tokens, self.beta,
            token_loss_sum=sums[-1] if self.spec.level == "token" else None, token_prob_sum=sums[2].detach(),
            kl_sum=sums[3] if kl is not None else None)
        if not self.counts_here:
            denominator, sum_stats = denominator * 0, sum_stats * 0
        stats = {
            "sum_stats": sum_stats,
            "max_stats": max_stats,
            "logp_sum": logp_sum.detach(),
            "num_answer_tokens": num_answer_tokens,
        }
        return loss_sum, denominator.to(torch.int), stats

    def _token_log_probs(self, batch: SFTBatch, output: torch.Tensor):
        """This micro-batch's per-position label log-probs, and the KL to the reference where the loss reads it."""
        if REF_LOGITS not in self.spec.reads:
            return self.log_probs(output, batch.labels), None
        if batch.ref_hidden is None or self.reference_log_probs is None:
            raise ValueError("this loss reads the reference's distribution: no reference hidden states or head")
        return self.log_probs.with_kl(output, batch.labels, batch.ref_hidden, self.reference_log_probs)


class LogProbCollector:
    """The non-loss-data function of a forward-only pass: each micro-batch's `SequenceLogProbs`, no loss."""

    def __init__(self, log_probs: OutputLogProbs, cp_group=None, keep_token_log_probs: bool = False,
                 keep_hidden: bool = False):
        self.log_probs = log_probs
        self.cp_group = cp_group
        self.keep_token_log_probs = keep_token_log_probs
        """Also keep every position's label log-prob `[b, s]` (score --per-token, losses reading REF_TOKENS)."""
        self.keep_hidden = keep_hidden
        """Also keep the model's output, its final hidden states (losses reading REF_LOGITS)."""

    def __call__(self, batch: SFTBatch, output: torch.Tensor, non_loss_data: bool = True) -> SequenceLogProbs:
        result = sequence_log_probs(batch, output, self.log_probs, self.cp_group, self.keep_token_log_probs)
        return result._replace(logp_sum=result.logp_sum.detach(),
                               hidden=output.detach() if self.keep_hidden else None)


def packed_seq_params(batch: SFTBatch):
    """megatron-core's PackedSeqParams for a THD micro-batch (None for rows)."""
    if batch.thd is None:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    t = batch.thd
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=t.cu_seqlens, cu_seqlens_kv=t.cu_seqlens,
                           cu_seqlens_q_padded=t.cu_seqlens_padded, cu_seqlens_kv_padded=t.cu_seqlens_padded,
                           max_seqlen_q=t.max_seqlen, max_seqlen_kv=t.max_seqlen)


def router_padding_mask(model, batch: SFTBatch) -> dict:
    """`padding_mask` for an MoE model's routers ([b, s] True at padding; megatron-core leaves those positions out of
    the auxiliary losses), else nothing. megatron-core's GPTModel splits it for sequence parallelism on the first
    pipeline stage only; a later stage gets its TP rank's positions here, as its hidden states hold."""
    gpt = unwrap(model)
    if batch.padding is None or gpt.config.num_moe_experts is None:
        return {}
    padding = batch.padding
    if gpt.config.sequence_parallel and not gpt.pre_process:
        tp = gpt.pg_collection.tp
        padding = padding.transpose(0, 1).chunk(tp.size())[tp.rank()].transpose(0, 1).contiguous()  # [b, s/tp]
    return {"padding_mask": padding}


def make_forward_step(loss_function):
    """forward_step_func(data_iterator, model) for get_forward_backward_func(); the iterator yields whole
    SFTBatch micro-batches, and each context-parallel rank feeds the model its own share of the positions."""

    def forward_step(data_iterator, model):
        batch = context_parallel_share(next(data_iterator), loss_function.cp_group)
        output = model(batch.tokens, batch.position_ids, batch.attention_mask,
                       packed_seq_params=packed_seq_params(batch), **router_padding_mask(model, batch),
                       **forward_kwargs(model))
        return output, functools.partial(loss_function, batch)  # output: logits [b, s/cp, V/tp] or hidden states

    return forward_step


def check_schedule_config(config, forward_only: bool = False) -> None:
    """The model config settings the exact normalisation relies on (gradients only with `forward_only` False)."""
    if not config.calculate_per_token_loss:
        raise ValueError("set calculate_per_token_loss=True: the losses divide once by the global denominator")
    if not forward_only and config.finalize_model_grads_func is None:
        raise ValueError("set finalize_model_grads_func (megatron.core.distributed.finalize_model_grads)")


def _run_schedule(model: list, batches: list[SFTBatch], step_function, seq_length: int, micro_batch_size: int,
                  forward_only: bool):
    check_schedule_config(model[0].config, forward_only)
    if batches and batches[0].thd is not None:  # [1, T] rows of varying T: pipeline stages exchange shapes
        seq_length, micro_batch_size = max(b.tokens.size(1) for b in batches), 1
        model[0].config.variable_seq_lengths = True
    return get_forward_backward_func()(
        forward_step_func=make_forward_step(step_function),
        data_iterator=iter(batches),
        model=model,
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        collect_non_loss_data=isinstance(step_function, LogProbCollector),
    )


def forward_backward(model: list, batches: list[SFTBatch], loss_function: SFTLossFunction, seq_length: int,
                     micro_batch_size: int) -> list[dict]:
    """One global batch (this rank's micro-batches) forward and backward through megatron-core's schedule.

    Returns the per-micro-batch statistics on the last pipeline stage (an empty list elsewhere).
    """
    return _run_schedule(model, batches, loss_function, seq_length, micro_batch_size, forward_only=False)


@torch.no_grad()
def forward_losses(model: list, batches: list[SFTBatch], loss_function: SFTLossFunction, seq_length: int,
                   micro_batch_size: int) -> list[dict]:
    """`batches` forward-only through the schedule with the training loss function (held-out evaluation): the
    per-micro-batch statistics on the last pipeline stage for reduce_step_metrics, [] elsewhere. No gradient."""
    return _run_schedule(model, batches, loss_function, seq_length, micro_batch_size, forward_only=True)


@torch.no_grad()
def forward_log_probs(model: list, batches: list[SFTBatch], collector: LogProbCollector, seq_length: int,
                      micro_batch_size: int) -> SequenceLogProbs | None:
    """Score `batches` forward-only; on the last pipeline stage every sample's log-probs in order, else None."""
    parts = forward_log_prob_parts(model, batches, collector, seq_length, micro_batch_size)
    return concat_log_probs(parts) if parts else None


@torch.no_grad()
def forward_log_prob_parts(model: list, batches: list[SFTBatch], collector: LogProbCollector, seq_length: int,
                           micro_batch_size: int) -> list[SequenceLogProbs]:
    """Score `batches` forward-only; on the last pipeline stage each micro-batch's log-probs, else []."""
    return _run_schedule(model, batches, collector, seq_length, micro_batch_size, forward_only=True)


def reduce_step_metrics(losses_reduced: list[dict], dp_cp_group, has_reference: bool, has_kl: bool = False) -> dict:
    """One step's metrics from the per-micro-batch statistics of the last pipeline stage.

    Collectives: one all-reduce (sum) and one all-reduce (max) over `dp_cp_group`, once per step.
    Returns detached 0-d tensors (see loss.metrics_from_stats); call on last-stage ranks only.
    """
    sum_stats = torch.stack([d["sum_stats"] for d in losses_reduced]).sum(dim=0)
    max_stats = torch.stack([d["max_stats"] for d in losses_reduced]).amax(dim=0)
    all_reduce(sum_stats, dist.ReduceOp.SUM, dp_cp_group)
    all_reduce(max_stats, dist.ReduceOp.MAX, dp_cp_group)
    return metrics_from_stats(sum_stats, max_stats, has_reference, has_kl)
