"""Per-token log-probs from vocab-parallel logits, and per-sequence sums over answer tokens.

Shapes: `s` sequence, `b` micro-batch, `V` padded vocabulary, `tp` tensor-parallel size, `n` samples.
Every function takes its process groups as arguments; `None` means "not parallel in that dimension".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

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
        grad_logits.masked_fill_((grad_logp == 0).unsqueeze(-1), 0.0)
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
    hidden: torch.Tensor | None = None
    """The last stage's output (final hidden states) for this rank's positions, detached, when asked for."""


def sequence_log_probs(batch: SFTBatch, output: torch.Tensor, log_probs: "OutputLogProbs", cp_group,
                       keep_token_log_probs: bool = False) -> SequenceLogProbs:
    """Per-sample answer log-prob sums and answer-token counts for one micro-batch.

    Args:
        output: the last stage's output for this CP rank's part of the micro-batch: logits `[b, s, V/tp]`, or
            the final hidden states when `log_probs` computes the logits itself (see OutputLogProbs).
        keep_token_log_probs: also return the detached per-token log-probs `[b, s]`.
    Returns:
        SequenceLogProbs with totals over the CP group.
        Collectives: `log_probs`' over its TP group, 1 all-reduce over `cp_group`.
    """
    token_logp = log_probs(output, batch.labels)  # [b, s]
    logp_sum, num_tokens = answer_sums(batch, [token_logp, torch.ones_like(token_logp)], cp_group)
    kept = token_logp.detach() if keep_token_log_probs else None
    return SequenceLogProbs(logp_sum, num_tokens.round().to(torch.int64), kept)


def answer_sums(batch: SFTBatch, token_values: list[torch.Tensor], cp_group) -> torch.Tensor:
    """`[k, n]`: for each of the `k` per-position tensors `[b, s]` (this CP rank's positions), each sample's sum over
    its answer tokens, totalled over the CP group. Collectives: 1 all-reduce of `[k, n]` over `cp_group` (backward
    identity, see context_parallel_sum)."""
    ids, n = batch.position_sample_ids(), batch.num_samples
    partial = torch.stack([sequence_sums(v, batch.loss_mask, ids, n) for v in token_values])  # [k, n]
    return context_parallel_sum(partial, cp_group)


def concat_log_probs(parts: list[SequenceLogProbs]) -> SequenceLogProbs:
    """Several micro-batches' results as one, samples (and rows) in order (per-sample fields and token log-probs)."""
    tokens = None if parts[0].token_logp is None else torch.cat([p.token_logp for p in parts])
    return SequenceLogProbs(torch.cat([p.logp_sum for p in parts]),
                            torch.cat([p.num_answer_tokens for p in parts]), tokens)


# ---- fused output layer + log-probs ----------------------------------------------------------------------------

def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64: the dtype log-probs are computed in."""
    return torch.promote_types(dtype, torch.float32)


class _ChunkBuffers:
    """The `[chunk, V/tp]` buffers of one chunk's logits, allocated once per forward (or backward) and reused by
    every chunk: the matmul's output in the weight's dtype and its upcast to the math dtype (one buffer when they
    agree). On a CPU each fresh buffer of this size is a new mmap whose pages the kernel faults in and zeroes:
    allocating them per chunk cost about a quarter of the op's time (docs/performance.md)."""

    def __init__(self, chunk: int, weight: torch.Tensor):
        shape = dict(device=weight.device)
        self.math = torch.empty(chunk, weight.size(0), dtype=_math_dtype(weight.dtype), **shape)  # [chunk, V/tp]
        self.low = None if weight.dtype == self.math.dtype else \
            torch.empty(chunk, weight.size(0), dtype=weight.dtype, **shape)  # [chunk, V/tp]

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int, vocab_start: int) -> torch.Tensor:
        """`[c, V/tp]` logits of `c` <= chunk positions in the math dtype (a view of the buffer): the output
        layer's matmul in its own dtype, then upcast, padded vocabulary columns -inf (so they take no
        probability)."""
        rows = hidden.size(0)
        if self.low is None:
            logits = torch.mm(hidden, weight.t(), out=self.math[:rows])
        else:
            logits = self.math[:rows].copy_(torch.mm(hidden, weight.t(), out=self.low[:rows]))
        if vocab_size < vocab_start + logits.size(-1):
            logits[:, max(vocab_size - vocab_start, 0):] = float("-inf")
        return logits

    def in_weight_dtype(self, values: torch.Tensor) -> torch.Tensor:
        """`values` (a view of the math buffer) in the weight's dtype, in the other buffer."""
        return values if self.low is None else self.low[:values.size(0)].copy_(values)


WGRAD_BLOCK = 8192
"""Vocabulary rows per step when the weight gradient is added into an accumulator of another dtype."""


def _add_weight_grad(accumulator: torch.Tensor, d_logits: torch.Tensor, hidden: torch.Tensor,
                     block: torch.Tensor | None) -> None:
    """accumulator [V/tp, h] += d_logits^T [V/tp, c] @ hidden [c, h]: in place when the dtypes agree, else (bf16
    products into an fp32 main_grad) WGRAD_BLOCK vocabulary rows at a time through `block` `[WGRAD_BLOCK, h]`,
    so no [V/tp, h] temporary exists."""
    if accumulator.dtype == d_logits.dtype:
        accumulator.addmm_(d_logits.t(), hidden)
        return
    for start in range(0, accumulator.size(0), WGRAD_BLOCK):
        rows = slice(start, start + WGRAD_BLOCK)
        product = d_logits[:, rows].t()  # [r, c]
        accumulator[rows].add_(torch.mm(product, hidden, out=block[:product.size(0)]))


class _WeightGradient:
    """The output weight's gradient during a fused op's backward: added into `weight.main_grad` where megatron-core's
    DDP keeps one (its gradient-accumulation-fusion protocol), else into a fresh tensor in `dtype`; a
    `[WGRAD_BLOCK, h]` block when the accumulator's dtype is not the weight's (_add_weight_grad)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        self.weight = weight
        self.into_main_grad = hasattr(weight, "grad_added_to_main_grad") and hasattr(weight, "main_grad")
        self.accumulator = weight.main_grad if self.into_main_grad else torch.zeros_like(weight, dtype=dtype)
        self.block = None if self.accumulator.dtype == weight.dtype else \
            torch.empty(min(WGRAD_BLOCK, weight.size(0)), weight.size(1), dtype=weight.dtype, device=weight.device)

    def add_chunk(self, buffers: "_ChunkBuffers", d_logits: torch.Tensor, no_gradient: torch.Tensor, labels, g,
                  vocab_start: int, hidden: torch.Tensor, grad_hidden: torch.Tensor) -> None:
        """One chunk's end of backward: the labels' onehot term `g` added into `d_logits` `[c, V/tp]` (math dtype),
        rows `no_gradient` `[c]` zeroed (0 * nan stays out), then this shard's hidden-state gradient into
        `grad_hidden` `[c, h]` and the weight's into the accumulator."""
        column, here = _label_columns(labels, vocab_start, self.weight.size(0))
        d_logits[here, column[here]] += g[here]
        d_logits = buffers.in_weight_dtype(d_logits.masked_fill_(no_gradient[:, None], 0.0))
        torch.mm(d_logits, self.weight, out=grad_hidden)  # [c, h]
        _add_weight_grad(self.accumulator, d_logits, hidden, self.block)

    def result(self, hidden: torch.Tensor) -> torch.Tensor:
        """What backward returns for the weight: a placeholder once main_grad holds the gradient, else the gradient."""
        if not self.into_main_grad:
            return self.accumulator.to(self.weight.dtype)
        self.weight.grad_added_to_main_grad = True
        shape = dict(dtype=hidden.dtype, device=hidden.device)
        return torch.zeros(self.weight.shape, **shape) if getattr(self.weight, "zero_out_wgrad", False) else \
            torch.empty(self.weight.shape, **shape)


def _label_columns(labels: torch.Tensor, vocab_start: int, width: int):
    """(this shard's column of each label, whether the label is on this shard) for `labels` `[c]`."""
    local = labels - vocab_start
    here = (local >= 0) & (local < width)
    return torch.where(here, local, 0), here


class _FusedOutputLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight^T)[label], `chunk` positions at a time, the vocabulary split over `tp_group`.

    Forward, per chunk: the chunk's logits `[c, V/tp]`, their max over this shard, the label's logit (on its
    shard) and the sum of exp(logit - shard max). Then, once for all positions, all-reduces over `tp_group` of
    the max (`[N]`) and of the label logit and the sum of exps rescaled to that max (`[2, N]`): 2 collectives per
    call whatever the number of chunks. Keeps only each position's log-sum-exp.
    Backward, per chunk: the logits again, d logp / d logits = onehot - softmax (exactly 0 where the upstream
    gradient is 0), this shard's part of the hidden states' gradient (the caller's region op reduces it over TP)
    and the weight's gradient, added to `weight.main_grad` where megatron-core's DDP keeps one (its own
    gradient-accumulation-fusion protocol), else returned. Peak memory: two `[chunk, V/tp]` buffers (one in the
    weight's dtype, one in fp32) reused by every chunk, and a `[WGRAD_BLOCK, h]` one in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_size, tp_group, chunk):
        rank, world_size = _rank_and_size(tp_group)
        width = weight.size(0)
        vocab_start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(width, rank, world_size)
        buffers = _ChunkBuffers(min(chunk, hidden.size(0)), weight)
        math_dtype = _math_dtype(weight.dtype)
        shard_max = torch.empty(hidden.size(0), dtype=math_dtype, device=hidden.device)  # [N] this shard's max
        label_and_sum = torch.empty(2, hidden.size(0), dtype=math_dtype, device=hidden.device)  # [2, N]
        for start in range(0, hidden.size(0), chunk):
            part = slice(start, start + chunk)
            logits = buffers.logits(hidden[part], weight, vocab_size, vocab_start)  # [c, V/tp]
            shard_max[part] = logits.max(dim=-1).values
            column, here = _label_columns(labels[part], vocab_start, width)
            label_and_sum[0, part] = torch.where(here, logits.gather(-1, column[:, None])[:, 0], 0.0)
            finite_max = torch.where(shard_max[part] == float("-inf"), 0.0, shard_max[part])  # a padding-only
            label_and_sum[1, part] = logits.sub_(finite_max[:, None]).exp_().sum(dim=-1)  # shard sums to 0
        logits_max = shard_max.clone()
        all_reduce(logits_max, dist.ReduceOp.MAX, tp_group)  # [N] the max over the whole vocabulary
        label_and_sum[1].mul_(torch.exp(shard_max - logits_max))  # each shard's sum of exp(logit - that max)
        all_reduce(label_and_sum, dist.ReduceOp.SUM, tp_group)  # the label's logit (on its shard), the sum of exps
        lse = logits_max + label_and_sum[1].log()  # [N] log-sum-exp, all that backward keeps per position
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.meta = (vocab_size, vocab_start, chunk)
        return label_and_sum[0] - lse

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, labels, lse = ctx.saved_tensors
        vocab_size, vocab_start, chunk = ctx.meta
        weight_grad = _WeightGradient(weight, lse.dtype)
        grad_hidden = torch.empty_like(hidden)
        buffers = _ChunkBuffers(min(chunk, hidden.size(0)), weight)
        for start in range(0, hidden.size(0), chunk):
            part = slice(start, start + chunk)
            g = grad_logp[part].to(lse.dtype)  # [c]
            softmax = buffers.logits(hidden[part], weight, vocab_size, vocab_start).sub_(lse[part, None]).exp_()
            d_logits = softmax.mul_(-g[:, None])  # [c, V/tp]: g * (onehot - softmax), the onehot next
            weight_grad.add_chunk(buffers, d_logits, g == 0, labels[part], g, vocab_start, hidden[part],
                                  grad_hidden[part])
        return grad_hidden, weight_grad.result(hidden), None, None, None, None


def _gathered_hidden(hidden: torch.Tensor, tp_group, sequence_parallel: bool) -> torch.Tensor:
    """`[b, s, h]` hidden states as the output layer takes them: gathered over TP along the sequence under sequence
    parallelism (backward: reduce-scatter), else entering the TP region (backward: all-reduce)."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    if _rank_and_size(tp_group)[1] > 1 and sequence_parallel:  # gathered along the sequence, [s/tp, b, h] first
        return gather_from_sequence_parallel_region(hidden.transpose(0, 1), tensor_parallel_output_grad=True,
                                                    group=tp_group).transpose(0, 1)  # [b, s, h]
    if _rank_and_size(tp_group)[1] > 1:  # no transposes: megatron-core all-reduces a gradient in place only
        return copy_to_tensor_model_parallel_region(hidden, group=tp_group)  # when it is contiguous
    return hidden


def fused_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                    tp_group=None, sequence_parallel: bool = False, chunk_size: int = 1024) -> torch.Tensor:
    """Log-probability of each label from the final hidden states and the output layer's weight, without the
    full-vocabulary logits: the output layer and `vocab_parallel_log_probs` in one, `chunk_size` positions at a
    time, exact (the same numbers as the output layer then vocab_parallel_log_probs).

    Args:
        hidden: `[b, s, h]` final hidden states (after the final norm); under sequence parallelism `[b, s/tp, h]`,
            gathered over `tp_group` as the output layer gathers them.
        weight: `[V/tp, h]` this rank's rows of the output layer's (or the tied embedding's) weight.
        labels: `[b, s]` token ids in `[0, vocab_size)`.
    Returns:
        `[b, s]` float32 log-probs (float64 for a float64 weight), the same on every TP rank. Collectives: the
        output layer's on the hidden
        states (all-gather under SP; its backward an all-reduce or reduce-scatter), 2 all-reduces over
        `tp_group` in forward (whatever the number of chunks) and none in backward.
    """
    hidden = _gathered_hidden(hidden, tp_group, sequence_parallel)
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree")
    flat = hidden.reshape(-1, hidden.size(-1)).to(weight.dtype)  # [b * s, h]
    logp = _FusedOutputLogProbs.apply(flat, weight, labels.reshape(-1), vocab_size, tp_group, chunk_size)
    return logp.view(labels.shape)


# ---- fused output layer + log-probs + KL to the reference (ASFT, sft_kl) -------------------------------------

def _pad_columns(vocab_size: int, vocab_start: int, width: int) -> int | None:
    """The first padded column of this shard (None: every column is real)."""
    return max(vocab_size - vocab_start, 0) if vocab_size < vocab_start + width else None


class _FusedLogProbsAndKL(torch.autograd.Function):
    """Per position, log p(label) and KL(pi_ref || pi_theta) over the full vocabulary, from both models' final hidden
    states and output weights, `chunk` positions at a time, the vocabulary split over `tp_group`; the reference is a
    constant.

    With z the policy's logits and r the reference's: KL = sum_v p_r (r - z) - lse(r) + lse(z). Forward, per chunk:
    both logits `[c, V/tp]`, each shard's maxes, sums of exp and the cross term sum_v exp(r - max_r) (r - z), and
    the label's logit. Then, once for all positions: an all-reduce (max) of `[2, N]` and one (sum) of `[4, N]`,
    the shard sums rescaled to the global maxes. Keeps each position's two log-sum-exps.
    Backward, per chunk: both logits again, d/dz = g_logp (onehot - p_z) + g_kl (p_z - p_r), this shard's part of
    the hidden states' gradient and the weight's (into `main_grad` where DDP keeps one), as _FusedOutputLogProbs.
    Peak memory: four `[chunk, V/tp]` buffers (two per model), never a full-vocabulary tensor."""

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, labels, vocab_size, tp_group, chunk):
        rank, world_size = _rank_and_size(tp_group)
        width = weight.size(0)
        vocab_start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(width, rank, world_size)
        pad = _pad_columns(vocab_size, vocab_start, width)
        rows = min(chunk, hidden.size(0))
        policy, reference = _ChunkBuffers(rows, weight), _ChunkBuffers(rows, ref_weight)
        math_dtype = _math_dtype(weight.dtype)
        n = hidden.size(0)
        shard_max = torch.empty(2, n, dtype=math_dtype, device=hidden.device)  # [2, N] policy, reference
        sums = torch.empty(4, n, dtype=math_dtype, device=hidden.device)  # label logit, sum exp z, sum exp r, cross
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            z = policy.logits(hidden[part], weight, vocab_size, vocab_start)  # [c, V/tp]
            r = reference.logits(ref_hidden[part], ref_weight, vocab_size, vocab_start)  # [c, V/tp]
            shard_max[0, part], shard_max[1, part] = z.max(dim=-1).values, r.max(dim=-1).values
            column, here = _label_columns(labels[part], vocab_start, width)
            sums[0, part] = torch.where(here, z.gather(-1, column[:, None])[:, 0], 0.0)
            finite = torch.where(shard_max[:, part] == float("-inf"), 0.0, shard_max[:, part])  # [2, c]
            difference = r - z  # [c, V/tp]; padded columns -inf - -inf: set to 0 below
            if pad is not None:
                difference[:, pad:] = 0.0
            sums[1, part] = z.sub_(finite[0, :, None]).exp_().sum(dim=-1)
            r = r.sub_(finite[1, :, None]).exp_()  # exp(r - shard max)
            sums[2, part] = r.sum(dim=-1)
            sums[3, part] = (r * difference).sum(dim=-1)
        global_max = shard_max.clone()
        all_reduce(global_max, dist.ReduceOp.MAX, tp_group)  # [2, N]
        scale = torch.exp(shard_max - global_max)  # [2, N] each shard's sums to the global maxes
        sums[1].mul_(scale[0])
        sums[2:].mul_(scale[1])
        all_reduce(sums, dist.ReduceOp.SUM, tp_group)
        lse = global_max + sums[1:3].log()  # [2, N] log-sum-exp of z and of r
        kl = sums[3] / sums[2] - lse[1] + lse[0]  # [N]
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, labels, lse)
        ctx.meta = (vocab_size, vocab_start, chunk)
        return sums[0] - lse[0], kl

    @staticmethod
    def backward(ctx, grad_logp, grad_kl):
        hidden, weight, ref_hidden, ref_weight, labels, lse = ctx.saved_tensors
        vocab_size, vocab_start, chunk = ctx.meta
        weight_grad = _WeightGradient(weight, lse.dtype)
        grad_hidden = torch.empty_like(hidden)
        rows = min(chunk, hidden.size(0))
        policy, reference = _ChunkBuffers(rows, weight), _ChunkBuffers(rows, ref_weight)
        zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
        grad_logp = zero.expand(lse.size(1)) if grad_logp is None else grad_logp
        grad_kl = zero.expand(lse.size(1)) if grad_kl is None else grad_kl
        for start in range(0, hidden.size(0), chunk):
            part = slice(start, start + chunk)
            g, k = grad_logp[part].to(lse.dtype), grad_kl[part].to(lse.dtype)  # [c]
            p_z = policy.logits(hidden[part], weight, vocab_size, vocab_start).sub_(lse[0, part, None]).exp_()
            p_r = reference.logits(ref_hidden[part], ref_weight, vocab_size, vocab_start).sub_(
                lse[1, part, None]).exp_()
            d_logits = p_z.mul_((k - g)[:, None]).sub_(p_r.mul_(k[:, None]))  # [c, V/tp]: (k - g) p_z - k p_r
            weight_grad.add_chunk(policy, d_logits, (g == 0) & (k == 0), labels[part], g, vocab_start, hidden[part],
                                  grad_hidden[part])
        return grad_hidden, weight_grad.result(hidden), None, None, None, None, None, None


def fused_log_probs_and_kl(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
                           ref_weight: torch.Tensor, labels: torch.Tensor, vocab_size: int, tp_group=None,
                           sequence_parallel: bool = False, chunk_size: int = 1024):
    """(log p(label) `[b, s]`, KL(pi_ref || pi_theta) `[b, s]`) at every position, float32 (float64 for a float64
    weight), the same on every TP rank, from the policy's final hidden states and output weight (differentiable) and
    the reference's (constants), without either model's full-vocabulary logits (_FusedLogProbsAndKL).

    Args: `hidden`, `ref_hidden` `[b, s, h]` (under sequence parallelism `[b, s/tp, h]`, gathered over `tp_group`);
    `weight`, `ref_weight` `[V/tp, h]`; `labels` `[b, s]`. Collectives: the output layer's on the hidden states
    (the reference's gathered too under SP), 2 all-reduces over `tp_group` in forward, none in backward.
    """
    hidden, ref_hidden = (_gathered_hidden(h, tp_group, sequence_parallel) for h in (hidden, ref_hidden))
    if hidden.shape[:-1] != labels.shape or ref_hidden.shape != hidden.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)}, reference hidden states {tuple(ref_hidden.shape)} "
                         f"and labels {tuple(labels.shape)} disagree")
    flat = hidden.reshape(-1, hidden.size(-1)).to(weight.dtype)  # [b * s, h]
    ref_flat = ref_hidden.detach().reshape(-1, ref_hidden.size(-1)).to(ref_weight.dtype)
    logp, kl = _FusedLogProbsAndKL.apply(flat, weight, ref_flat, ref_weight.detach(), labels.reshape(-1), vocab_size,
                                         tp_group, chunk_size)
    return logp.view(labels.shape), kl.view(labels.shape)


@dataclass
class OutputLogProbs:
    """Turns the last pipeline stage's output into each label's log-prob, one of two ways:
    `chunk_size` 0: the output is the logits `[b, s, V/tp]` (vocab_parallel_log_probs);
    `chunk_size` > 0: it is the final hidden states (model.hidden_states_out), and the logits are made
    `chunk_size` positions at a time from the output layer's weight (fused_log_probs), never all at once."""

    vocab_size: int
    """The real vocabulary; padded columns take no probability."""
    tp_group: object = None
    chunk_size: int = 0
    weight: Callable[[], torch.Tensor] | None = None
    """The output layer's (or the tied embedding's) weight `[V/tp, h]` (chunk_size > 0)."""
    sequence_parallel: bool = False
    """The hidden states are split over TP along the sequence (chunk_size > 0)."""

    def __call__(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`[b, s]` float32 log-probs of `labels` `[b, s]`."""
        if self.chunk_size == 0:
            return vocab_parallel_log_probs(output, labels, self.vocab_size, self.tp_group)
        return fused_log_probs(output, self.weight(), labels, self.vocab_size, self.tp_group,
                               self.sequence_parallel, self.chunk_size)

    def with_kl(self, output: torch.Tensor, labels: torch.Tensor, ref_output: torch.Tensor,
                reference: "OutputLogProbs") -> tuple[torch.Tensor, torch.Tensor]:
        """(`[b, s]` log-probs of `labels`, `[b, s]` KL(pi_ref || pi_theta) at each position) from this model's final
        hidden states `output` and the reference's `ref_output` with its weight (fused_log_probs_and_kl)."""
        if self.chunk_size == 0 or reference.chunk_size == 0:
            raise ValueError("the KL to the reference is computed fused only (loss.logprob_chunk_size > 0)")
        return fused_log_probs_and_kl(output, self.weight(), ref_output, reference.weight(), labels, self.vocab_size,
                                      self.tp_group, self.sequence_parallel, self.chunk_size)

    def last_position_logits(self, output: torch.Tensor) -> torch.Tensor:
        """`[b, V/tp]` logits of the last position of each row (greedy decoding), whichever the output is."""
        if self.chunk_size == 0:
            return output[:, -1].float()
        if self.sequence_parallel and _rank_and_size(self.tp_group)[1] > 1:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            output = gather_from_sequence_parallel_region(output.transpose(0, 1), group=self.tp_group).transpose(0, 1)
        return (output[:, -1] @ self.weight().t()).float()
