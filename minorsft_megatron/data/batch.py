"""One micro-batch of SFT samples as tensors: the `SFTBatch` type, and what builds, merges, masks and splits
micro-batches.

A sample of n + 1 tokens fills n positions: tokens ids[:-1], labels ids[1:] (the label at position t is token
t + 1 of the same sample) and loss mask answer_mask[1:]. Three layouts:
- padded rows `[b, s]`, one sample each;
- packed rows `[b, s]`, several samples end to end, described by `cu_seqlens` over the flattened `[b * s]`
  positions, attending through a block-diagonal mask (megatron-core's local spec);
- THD `[1, T]`: the samples end to end, each padded to a multiple of 2 * cp (Transformer Engine's attention,
  told where each sequence is by `thd`, a `PackedSequences`).
Every position knows its sample (`position_sample_ids()`), which is what per-sample sums are taken over, also
after a context-parallel split (`context_parallel_share`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PackedSequences:
    """The attention sequences of a THD micro-batch, as Transformer Engine takes them: sequence j holds positions
    [cu_seqlens_padded[j], cu_seqlens_padded[j] + (cu_seqlens[j + 1] - cu_seqlens[j])) of the [1, T] tensors,
    then padding up to cu_seqlens_padded[j + 1]. The samples come first, in order; a sequence of padding alone may
    follow (it attends only to itself and belongs to no sample)."""

    cu_seqlens: torch.Tensor
    """[k + 1] int32 cumulative real lengths."""
    cu_seqlens_padded: torch.Tensor
    """[k + 1] int32 cumulative padded lengths: where each sequence starts in the [1, T] tensors."""
    max_seqlen: int
    """The longest padded sequence."""

    def to(self, device) -> "PackedSequences":
        return PackedSequences(self.cu_seqlens.to(device), self.cu_seqlens_padded.to(device), self.max_seqlen)


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
    sample_id: torch.Tensor | None = None
    """[b, s] int64 the sample each position belongs to, n for positions of no sample; None: derived from
    cu_seqlens (packed rows) or one sample per row."""
    thd: PackedSequences | None = None
    """THD micro-batches ([1, T] tensors): the attention sequences; None: rows."""
    padding: torch.Tensor | None = None
    """[b, s] bool, True at positions that hold no sample's token (a row's tail, a THD sample's padding): what
    megatron-core's MoE routers leave out of their auxiliary losses (`padding_mask`); None: no padding known."""
    ref_token_logp: torch.Tensor | None = None
    """[b, s] float32 each position's label log-prob under the frozen reference, for the losses that read it
    (loss.REF_TOKENS); under context parallelism only this rank's positions are filled."""
    ref_hidden: torch.Tensor | None = None
    """The frozen reference's final hidden states on this rank, as its last pipeline stage output them: [b, s/cp, h]
    ([b, s/(cp tp), h] under sequence parallelism), already this rank's context-parallel share (not split again),
    for the losses that read the reference's distribution (loss.REF_LOGITS)."""

    def to(self, device: torch.device) -> "SFTBatch":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self) if getattr(self, f.name) is not None})

    @property
    def num_samples(self) -> int:
        if self.sample_index is not None:
            return len(self.sample_index)
        return self.tokens.size(0) if self.cu_seqlens is None else self.cu_seqlens.numel() - 1

    def position_sample_ids(self) -> torch.Tensor:
        """[b, s] int64 the sample of each position (num_samples for positions of no sample)."""
        if self.sample_id is not None:
            return self.sample_id
        b, s = self.tokens.shape
        if self.cu_seqlens is not None:
            return sample_ids(self.cu_seqlens, b * s).view(b, s)
        return torch.arange(b, device=self.tokens.device)[:, None].expand(b, s).contiguous()


# ---- sample positions -----------------------------------------------------------------------------------------

def sample_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """For each of `num_tokens` flattened positions, the sample it belongs to; `n` for trailing padding.

    Args:
        cu_seqlens: `[n + 1]` cumulative sample lengths, starting at 0, over the flattened `[b * s]` tokens.
    """
    positions = torch.arange(num_tokens, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)  # [b * s]


def packed_causal_mask(cu_seqlens: torch.Tensor, batch_size: int, seq_length: int) -> torch.Tensor:
    """[b, 1, s, s] bool attention mask for packed rows on the local spec: True where attention is blocked.

    Position t attends to positions <= t of its own sample only; trailing padding attends among itself.
    """
    ids = sample_ids(cu_seqlens, batch_size * seq_length).view(batch_size, seq_length)  # [b, s]
    same_sample = ids[:, :, None] == ids[:, None, :]  # [b, s, s]
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool, device=ids.device).tril()
    return ~(same_sample & causal).unsqueeze(1)


# ---- building micro-batches from a dataset --------------------------------------------------------------------

def fill_rows(dataset, rows: list[list[int]], seq_length: int):
    """Row tensors for `rows` of dataset indices, samples laid end to end (tokens, labels, loss mask, positions,
    padding), and each sample's end over the flattened [b * s] positions (a row's last sample ends at the row's
    end: its tail is padding)."""
    b, s = len(rows), seq_length
    tokens, labels = torch.zeros(b, s, dtype=torch.long), torch.zeros(b, s, dtype=torch.long)
    loss_mask, position_ids = torch.zeros(b, s), torch.arange(s).repeat(b, 1)
    padding = torch.ones(b, s, dtype=torch.bool)
    ends = []
    for r, row in enumerate(rows):
        at = 0
        for index in row:
            ids = torch.from_numpy(dataset.tokens(index))  # [n + 1]
            answer = torch.from_numpy(dataset.answer_mask(index).astype(np.float32))  # [n + 1]
            n = len(ids) - 1
            tokens[r, at : at + n], labels[r, at : at + n] = ids[:-1], ids[1:]
            loss_mask[r, at : at + n] = answer[1:]
            position_ids[r, at : at + n] = torch.arange(n)
            padding[r, at : at + n] = False
            at += n
            ends.append(r * s + at)
        if row:  # the row's tail belongs to its last sample: positions run on
            position_ids[r, at:] = torch.arange(n, n + s - at)
            ends[-1] = (r + 1) * s
    return tokens, labels, loss_mask, position_ids, padding, ends


def padded_micro_batch(dataset, samples, seq_length: int) -> SFTBatch:
    """One sample per row, in the order given; a sample index of -1 is a row of padding alone (no answer token)."""
    rows = [[int(i)] if int(i) >= 0 else [] for i in samples]
    tokens, labels, loss_mask, position_ids, padding, _ = fill_rows(dataset, rows, seq_length)
    return SFTBatch(tokens, labels, loss_mask, position_ids, sample_index=torch.as_tensor(np.asarray(samples)),
                    padding=padding)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def thd_micro_batch(dataset, samples: list[int], sample_multiple: int, total_multiple: int) -> SFTBatch:
    """`samples` end to end in one [1, T] row (THD), each padded to a multiple of `sample_multiple`; T is a
    multiple of `total_multiple` (itself a multiple of `sample_multiple`), the rest being a sequence of padding.
    Labels never cross a sample: a sample's padding has label 0 and loss mask 0."""
    lengths = [len(dataset.tokens(i)) - 1 for i in samples]
    padded = [round_up(max(n, 1), sample_multiple) for n in lengths]
    total = round_up(max(sum(padded), 1), total_multiple)
    if total > sum(padded):  # the rest: one sequence of padding alone
        lengths, padded = lengths + [total - sum(padded)], padded + [total - sum(padded)]
    tokens, labels = torch.zeros(1, total, dtype=torch.long), torch.zeros(1, total, dtype=torch.long)
    loss_mask, position_ids = torch.zeros(1, total), torch.zeros(1, total, dtype=torch.long)
    sample_id = torch.full((1, total), len(samples), dtype=torch.long)
    padding = torch.ones(1, total, dtype=torch.bool)
    at = 0
    for j, width in enumerate(padded):
        position_ids[0, at : at + width] = torch.arange(width)
        if j < len(samples):
            ids = torch.from_numpy(dataset.tokens(samples[j]))  # [n + 1]
            answer = torch.from_numpy(dataset.answer_mask(samples[j]).astype(np.float32))
            n = lengths[j]
            tokens[0, at : at + n], labels[0, at : at + n], loss_mask[0, at : at + n] = ids[:-1], ids[1:], answer[1:]
            sample_id[0, at : at + width] = j
            padding[0, at : at + n] = False
        at += width
    cumulative = lambda values: torch.tensor([0] + list(np.cumsum(values)), dtype=torch.int32)  # noqa: E731
    return SFTBatch(tokens, labels, loss_mask, position_ids, sample_index=torch.tensor(samples, dtype=torch.long),
                    sample_id=sample_id, thd=PackedSequences(cumulative(lengths), cumulative(padded), max(padded)),
                    padding=padding)


def packed_micro_batch(dataset, rows: list[list[int]], seq_length: int) -> SFTBatch:
    """Packed rows with `cu_seqlens` `[n + 1]` and the block-diagonal causal mask; empty rows (padding) come
    last, past cu_seqlens[-1]."""
    tokens, labels, loss_mask, position_ids, padding, ends = fill_rows(dataset, rows, seq_length)
    cu_seqlens = torch.tensor([0] + ends, dtype=torch.int64)
    index = torch.tensor([i for row in rows for i in row], dtype=torch.long)
    return SFTBatch(tokens, labels, loss_mask, position_ids,
                    attention_mask=packed_causal_mask(cu_seqlens, len(rows), seq_length),
                    cu_seqlens=cu_seqlens, sample_index=index, padding=padding)


# ---- merging -------------------------------------------------------------------------------------------------

def _merged_cu_seqlens(batches: list[SFTBatch]) -> torch.Tensor:
    """The batches' sample boundaries over the rows of all of them, in order."""
    offset, parts = 0, [batches[0].cu_seqlens[:1]]
    for b in batches:
        parts.append(b.cu_seqlens[1:] + offset)
        offset += b.tokens.numel()
    return torch.cat(parts)


def _merged_sample_ids(batches: list[SFTBatch], dim: int) -> torch.Tensor:
    """Each batch's sample ids shifted past the samples before it; positions of no sample get the new count."""
    total, offset, parts = sum(b.num_samples for b in batches), 0, []
    for b in batches:
        ids = b.position_sample_ids()
        parts.append(torch.where(ids == b.num_samples, total, ids + offset))
        offset += b.num_samples
    return torch.cat(parts, dim=dim)


def _merged_sequences(batches: list[SFTBatch]) -> PackedSequences:
    def joined(key):
        offset, parts = 0, [getattr(batches[0].thd, key)[:1]]
        for b in batches:
            values = getattr(b.thd, key)
            parts.append(values[1:] + offset)
            offset += int(values[-1])
        return torch.cat(parts)

    return PackedSequences(joined("cu_seqlens"), joined("cu_seqlens_padded"), max(b.thd.max_seqlen for b in batches))


def merge_micro_batches(batches: list[SFTBatch]) -> SFTBatch:
    """One micro-batch holding the samples of `batches` in order (for a forward-only pass at a larger size): the
    rows of all of them, or (THD) one longer [1, T] row."""
    if len(batches) == 1:
        return batches[0]
    position_dim = 1 if batches[0].thd is not None else 0  # THD rows are joined end to end
    merged = {}
    for f in dataclasses.fields(SFTBatch):
        values = [getattr(b, f.name) for b in batches]
        if f.name == "sample_id":
            merged[f.name] = _merged_sample_ids(batches, position_dim)
        elif values[0] is None:
            merged[f.name] = None
        elif f.name == "cu_seqlens":
            merged[f.name] = _merged_cu_seqlens(batches)
        elif f.name == "thd":
            merged[f.name] = _merged_sequences(batches)
        elif f.name in ("ref_logp_sum", "sample_index"):
            merged[f.name] = torch.cat(values)
        else:
            merged[f.name] = torch.cat(values, dim=position_dim)
    return SFTBatch(**merged)


# ---- context parallelism ---------------------------------------------------------------------------------------

def context_parallel_share(batch: SFTBatch, cp_group) -> SFTBatch:
    """This context-parallel rank's positions of `batch`, split as megatron-core splits a sequence over `cp_group`
    (`get_batch_on_this_cp_rank`: 2 * cp chunks, rank r keeps chunks r and 2 * cp - 1 - r): each row of a rows
    layout, or each attention sequence of a THD micro-batch (what Transformer Engine's thd_get_partitioned_indices
    gives). Tokens, labels, loss mask, positions and the sample ids built on the full rows are split alike, so a
    label never leaves its position and per-sample sums are this rank's part of each sample's."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    if cp_group is None or cp_group.size() == 1:
        return batch
    if batch.attention_mask is not None:
        raise ValueError("a micro-batch with a dense attention mask (packed rows, local spec) cannot be split "
                         "for context parallelism")
    fields = {"tokens": batch.tokens, "labels": batch.labels, "loss_mask": batch.loss_mask,
              "position_ids": batch.position_ids, "sample_id": batch.position_sample_ids()}
    for name in ("padding", "ref_token_logp"):
        if getattr(batch, name) is not None:
            fields[name] = getattr(batch, name)
    if batch.thd is None:
        local = get_batch_on_this_cp_rank(dict(fields), cp_group)
    else:
        bounds = batch.thd.cu_seqlens_padded.tolist()
        parts = [get_batch_on_this_cp_rank({k: v[:, a:b] for k, v in fields.items()}, cp_group)
                 for a, b in zip(bounds[:-1], bounds[1:])]
        local = {k: torch.cat([part[k] for part in parts], dim=1) for k in fields}
    return dataclasses.replace(batch, cu_seqlens=None, **local)


def context_parallel_positions(batch: SFTBatch, cp_group) -> torch.Tensor:
    """[b, s/cp] the index, along the full rows, of each position context_parallel_share keeps on this rank."""
    index = torch.arange(batch.tokens.size(1), device=batch.tokens.device).expand_as(batch.tokens).contiguous()
    return context_parallel_share(dataclasses.replace(batch, tokens=index), cp_group).tokens
