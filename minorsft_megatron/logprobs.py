"""Per-token log-probs from vocab-parallel logits, and per-sequence sums over answer tokens.

Shapes: `s` sequence, `b` micro-batch, `V` padded vocabulary, `tp` tensor-parallel size, `n` samples.
Every function takes its process groups as arguments; `None` means "not parallel in that dimension".
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.tensor_parallel.utils import VocabUtility

from minorsft_megatron.data.batch import SFTBatch


def _rank_and_size(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce(tensor: torch.Tensor, op, group) -> None:
    """In-place all-reduce over `group`; nothing to do for None or a group of one."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


class _VocabParallelLogProbs(torch.autograd.Function):
    """log softmax(logits)[label], the vocabulary split over the tensor-parallel group.

    Forward: three all-reduces over `tp_group` (max, predicted logit, sum of exps), each of shape `[...]`.
    Backward: none; each rank returns the gradient of its own vocabulary shard,
    d logp / d logits = onehot(label) - softmax, and exactly 0 at positions whose upstream gradient is 0.
    """

    @staticmethod
    def forward(ctx, vocab_parallel_logits, labels, vocab_size, tp_group):
        input_dtype = vocab_parallel_logits.dtype
        math_dtype = torch.promote_types(input_dtype, torch.float32)  # fp32, or fp64 for fp64 input
        logits = vocab_parallel_logits.to(math_dtype)  # [..., V/tp]
        if logits is vocab_parallel_logits:
            logits = logits.clone()  # megatron's math steps below work in place
        rank, world_size = _rank_and_size(tp_group)
        partition_vocab_size = logits.size(-1)
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            partition_vocab_size, rank, world_size
        )
        if vocab_size < vocab_end:  # padding columns on this shard take no probability
            logits[..., max(vocab_size - vocab_start, 0) :] = float("-inf")

        logits_max = logits.max(dim=-1)[0]  # [...]
        all_reduce(logits_max, dist.ReduceOp.MAX, tp_group)
        target_mask, masked_target_1d, predicted_logits, sum_exp_logits, exp_logits = (
            VocabParallelCrossEntropy.calculate_predicted_logits(
                logits, labels, logits_max, vocab_start, vocab_end
            )
        )
        all_reduce(predicted_logits, dist.ReduceOp.SUM, tp_group)
        all_reduce(sum_exp_logits, dist.ReduceOp.SUM, tp_group)
        softmax, nll = VocabParallelCrossEntropy.calculate_cross_entropy_loss(
            exp_logits, predicted_logits, sum_exp_logits
        )
        ctx.input_dtype = input_dtype
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        return -nll  # [...]

    @staticmethod
    def backward(ctx, grad_logp):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_2d, arange_1d, softmax_update, grad_input = (
            VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask)
        )
        # megatron's steps give d nll / d logits = softmax - onehot; logp = -nll.
        grad_logits = VocabParallelCrossEntropy.calculate_gradients(
            grad_2d, arange_1d, masked_target_1d, softmax_update, grad_input, -grad_logp
        )
        # A position with no gradient (masked) gives none, even where its softmax is not finite (0 * nan is nan).
        grad_logits = torch.where((grad_logp != 0).unsqueeze(-1), grad_logits, 0.0)
        return grad_logits.to(ctx.input_dtype), None, None, None


def vocab_parallel_log_probs(
    vocab_parallel_logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int | None = None,
    tp_group=None,
) -> torch.Tensor:
    """Log-probability of each label under the full-vocabulary softmax, in fp32.

    Args:
        vocab_parallel_logits: `[s, b, V/tp]` (any leading shape), this rank's vocabulary shard, any dtype.
        labels: `[s, b]` (the same leading shape), token ids in `[0, vocab_size)`.
        vocab_size: the real vocabulary; columns `>= vocab_size` of the padded vocabulary are excluded from
            the softmax. None: every column is real.
        tp_group: the tensor-parallel group the vocabulary is split over (None: not split).

    Returns:
        `[s, b]` float32 log-probs (float64 for float64 logits), the same on every tensor-parallel rank. Collectives: 3 all-reduces over
        `tp_group` in forward.
    """
    if vocab_parallel_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(vocab_parallel_logits.shape)} and labels {tuple(labels.shape)} disagree: "
            "logits must be labels' shape plus a vocabulary dimension"
        )
    padded_vocab_size = vocab_parallel_logits.size(-1) * _rank_and_size(tp_group)[1]
    if vocab_size is None:
        vocab_size = padded_vocab_size
    if not 0 < vocab_size <= padded_vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is not in (0, {padded_vocab_size}] (the padded vocabulary)")
    return _VocabParallelLogProbs.apply(vocab_parallel_logits, labels, vocab_size, tp_group)


def sequence_sums(token_values: torch.Tensor, loss_mask: torch.Tensor, sample_id: torch.Tensor,
                  num_samples: int) -> torch.Tensor:
    """Sum of `token_values` over the answer tokens (`loss_mask` != 0) of each sample.

    Args:
        token_values: `[b, s]` per-token values (log-probs), or ones to count tokens.
        loss_mask: `[b, s]`, nonzero where the label at that position is an answer token.
        sample_id: `[b, s]` the sample of each position, `num_samples` for positions of no sample (see
            SFTBatch.position_sample_ids).

    Returns:
        `[n]` per-sample sums, in `token_values`' dtype. Masked positions are left out by selection, not by
        multiplication, so a non-finite value there (a padding position's garbage) cannot make a NaN. No
        collectives.
    """
    if token_values.shape != loss_mask.shape:
        raise ValueError(f"token values {tuple(token_values.shape)} and loss mask {tuple(loss_mask.shape)} disagree")
    if sample_id.shape != loss_mask.shape:
        raise ValueError(f"sample ids {tuple(sample_id.shape)} and loss mask {tuple(loss_mask.shape)} disagree")
    kept = torch.where(loss_mask != 0, token_values, torch.zeros((), dtype=token_values.dtype,
                                                                  device=token_values.device))  # [b, s]
    sums = kept.new_zeros(num_samples + 1).index_add(0, sample_id.reshape(-1), kept.reshape(-1))
    return sums[:num_samples]  # [n]


def context_parallel_sum(partial_sums: torch.Tensor, cp_group=None) -> torch.Tensor:
    """Total of per-sample partial sums over the context-parallel ranks that each hold part of a sequence.

    Forward: all-reduce (sum) over `cp_group`. Backward: identity, which is exact because every CP rank
    computes the same loss from the total and megatron-core sums parameter gradients over the CP ranks.
    """
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return partial_sums
    return reduce_from_tensor_model_parallel_region(partial_sums.clone(), group=cp_group)


class SequenceLogProbs(NamedTuple):
    """Per-sample answer log-probs of a micro-batch (or of several, concatenated in order)."""

    logp_sum: torch.Tensor
    """[n] float32 sum of each sample's answer-token log-probs (differentiable where computed with grad)."""
    num_answer_tokens: torch.Tensor
    """[n] int64 answer tokens of each sample."""
    token_logp: torch.Tensor | None = None
    """[b, s] detached log-prob of every position's label (this CP rank's positions), when asked for."""


def sequence_log_probs(batch: SFTBatch, logits: torch.Tensor, vocab_size: int, tp_group, cp_group,
                       keep_token_log_probs: bool = False) -> SequenceLogProbs:
    """Per-sample answer log-prob sums and answer-token counts for one micro-batch.

    Args:
        logits: `[b, s, V/tp]` from GPTModel (this rank's vocabulary shard, this CP rank's part of s).
        keep_token_log_probs: also return the detached per-token log-probs `[b, s]`.
    Returns:
        SequenceLogProbs with totals over the CP group.
        Collectives: 3 all-reduces over `tp_group`, 1 over `cp_group`.
    """
    token_logp = vocab_parallel_log_probs(logits, batch.labels, vocab_size, tp_group)  # [b, s]
    ids, n = batch.position_sample_ids(), batch.num_samples
    partial = torch.stack([sequence_sums(token_logp, batch.loss_mask, ids, n),
                           sequence_sums(torch.ones_like(token_logp), batch.loss_mask, ids, n)])  # [2, n]
    logp_sum, num_tokens = context_parallel_sum(partial, cp_group).unbind()
    kept = token_logp.detach() if keep_token_log_probs else None
    return SequenceLogProbs(logp_sum, num_tokens.round().to(torch.int64), kept)


def concat_log_probs(parts: list[SequenceLogProbs]) -> SequenceLogProbs:
    """Several micro-batches' results as one, samples (and rows) in order."""
    tokens = None if parts[0].token_logp is None else torch.cat([p.token_logp for p in parts])
    return SequenceLogProbs(torch.cat([p.logp_sum for p in parts]),
                            torch.cat([p.num_answer_tokens for p in parts]), tokens)
