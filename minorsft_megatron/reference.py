"""The frozen reference: co-located beside the policy, or a cache of its per-sample log-prob sums.

Either way, what reaches the policy's loss is `ref_logp_sum` `[n]` on each micro-batch: one float per sample,
needed on the last pipeline stage only; and, for the losses that read them (loss.REF_TOKENS, a reference model
only), `ref_token_logp` `[b, s]`, each position's label log-prob.

The cache's file format is in reference_cache.py.
"""

from __future__ import annotations

import torch

from minorsft_megatron.data.batch import context_parallel_positions, merge_micro_batches
from minorsft_megatron.forward_step import LogProbCollector, forward_log_prob_parts
from minorsft_megatron.reference_cache import ReferenceCacheError, read_cache


class CachedReference:
    """Reference log-prob sums looked up by `sample_index`; refuses a cache of another checkpoint or dataset."""

    def __init__(self, path: str, dataset_fingerprint: str, start_checkpoint_id: str | None):
        meta, self.logp_sum, self.num_answer_tokens = read_cache(path)
        cached_data, cached_ckpt = meta["dataset"]["fingerprint"], meta["checkpoint"]["checkpoint_id"]
        if cached_data != dataset_fingerprint:
            raise ReferenceCacheError(
                f"{path}: computed on dataset {cached_data[:12]} ({meta['dataset']['prefix']}), but this run "
                f"trains on dataset {dataset_fingerprint[:12]}"
            )
        if cached_ckpt != start_checkpoint_id:
            raise ReferenceCacheError(
                f"{path}: computed with checkpoint {cached_ckpt} ({meta['checkpoint']['path']}), but this run "
                f"starts from {start_checkpoint_id or 'a random initialisation'}"
            )

    def attach(self, micro_batches) -> None:
        for mb in micro_batches:
            mb.ref_logp_sum = self.logp_sum[mb.sample_index.cpu()].to(torch.float32).to(mb.tokens.device)


class ColocatedReference:
    """A frozen GPTModel with the policy's layout, run forward-only through the same pipeline schedule.

    `merge` policy micro-batches are scored as one larger micro-batch (when they divide evenly).
    """

    def __init__(self, model, collector: LogProbCollector, device, seq_length: int, micro_batch_size: int,
                 offload: bool = False, merge: int = 1):
        self.model, self.collector, self.device, self.offload = model, collector, device, offload
        self.seq_length, self.micro_batch_size, self.merge = seq_length, micro_batch_size, merge
        self.model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        if offload:
            self.model.to("cpu")

    @torch.no_grad()
    def attach(self, micro_batches) -> None:
        """Score the whole global batch; on the last stage, set each micro-batch's `ref_logp_sum`."""
        if self.offload:
            self.model.to(self.device)
        score_into(micro_batches, self.model, self.collector, self.seq_length, self.micro_batch_size, self.merge)
        if self.offload:
            self.model.to("cpu")


class BaseReference:
    """LoRA: the policy's own model with every adapter switched off, which is the starting model exactly, run
    forward-only through the same pipeline schedule before the policy's step; nothing is stored but the sums."""

    def __init__(self, model, collector: LogProbCollector, seq_length: int, micro_batch_size: int, merge: int = 1):
        """`model`: what the policy's schedule runs (its DistributedDataParallel)."""
        self.model, self.collector = model, collector
        self.seq_length, self.micro_batch_size, self.merge = seq_length, micro_batch_size, merge

    @torch.no_grad()
    def attach(self, micro_batches) -> None:
        from minorsft_megatron.lora import adapters_disabled

        with adapters_disabled(self.model):
            score_into(micro_batches, self.model, self.collector, self.seq_length, self.micro_batch_size,
                       self.merge)


def score_into(micro_batches, model, collector, seq_length: int, micro_batch_size: int, merge: int) -> None:
    """Score `micro_batches` forward-only with `model` (`merge` of them as one where they divide evenly); on the last
    pipeline stage, set each one's `ref_logp_sum` (and `ref_token_logp` when the collector keeps them)."""
    k = merge if len(micro_batches) % merge == 0 else 1
    groups = [micro_batches[i : i + k] for i in range(0, len(micro_batches), k)]
    batches = [merge_micro_batches(group) for group in groups]
    parts = forward_log_prob_parts([model], batches, collector, seq_length, micro_batch_size * k)
    for group, merged, part in zip(groups, batches, parts):  # none off the last pipeline stage
        sums = part.logp_sum.detach().split([mb.num_samples for mb in group])
        for mb, ref_logp_sum in zip(group, sums):
            mb.ref_logp_sum = ref_logp_sum
        if part.token_logp is not None:
            _attach_token_log_probs(group, merged, part.token_logp, collector.cp_group)
        if part.hidden is not None:
            if len(group) > 1:
                raise ValueError("reference hidden states are kept per policy micro-batch: score them unmerged")
            group[0].ref_hidden = part.hidden


def _attach_token_log_probs(group, merged, token_logp: torch.Tensor, cp_group) -> None:
    """Each micro-batch of `group` gets its positions of `token_logp` (this CP rank's positions of `merged`) as
    `ref_token_logp` [b, s], in the full layout that context_parallel_share splits again."""
    if cp_group is not None and cp_group.size() > 1:
        full = torch.zeros(merged.labels.shape, dtype=token_logp.dtype, device=token_logp.device)
        full.scatter_(1, context_parallel_positions(merged, cp_group), token_logp)
        token_logp = full
    position_dim = 1 if merged.thd is not None else 0  # THD micro-batches are joined end to end
    sizes = [mb.labels.size(position_dim) for mb in group]
    for mb, values in zip(group, token_logp.split(sizes, dim=position_dim)):
        mb.ref_token_logp = values.contiguous()
