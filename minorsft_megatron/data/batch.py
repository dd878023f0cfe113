"""One micro-batch of SFT rows as tensors: the `SFTBatch` type, and what builds, merges and masks micro-batches.

A sample of n + 1 tokens fills n positions of a row: tokens ids[:-1], labels ids[1:] (the label at position t
is token t + 1 of the same sample) and loss mask answer_mask[1:]. Padded rows hold one sample each; packed
rows hold several end to end, described by `cu_seqlens` over the flattened `[b * s]` positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch


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
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self) if torch.is_tensor(getattr(self, f.name))
        })


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
    """Row tensors for `rows` of dataset indices, samples laid end to end, and each sample's end over the
    flattened [b * s] positions (a row's last sample ends at the row's end: its tail is padding)."""
    b, s = len(rows), seq_length
    tokens, labels = torch.zeros(b, s, dtype=torch.long), torch.zeros(b, s, dtype=torch.long)
    loss_mask, position_ids = torch.zeros(b, s), torch.arange(s).repeat(b, 1)
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
            at += n
            ends.append(r * s + at)
        if row:  # the row's tail belongs to its last sample: positions run on
            position_ids[r, at:] = torch.arange(n, n + s - at)
            ends[-1] = (r + 1) * s
    return tokens, labels, loss_mask, position_ids, ends


def padded_micro_batch(dataset, samples, seq_length: int) -> SFTBatch:
    """One sample per row, in the order given."""
    tokens, labels, loss_mask, position_ids, _ = fill_rows(dataset, [[int(i)] for i in samples], seq_length)
    return SFTBatch(tokens, labels, loss_mask, position_ids, sample_index=torch.as_tensor(np.asarray(samples)))


def packed_micro_batch(dataset, rows: list[list[int]], seq_length: int) -> SFTBatch:
    """Packed rows with `cu_seqlens` `[n + 1]` and the block-diagonal causal mask; empty rows (padding) come
    last, past cu_seqlens[-1]."""
    tokens, labels, loss_mask, position_ids, ends = fill_rows(dataset, rows, seq_length)
    cu_seqlens = torch.tensor([0] + ends, dtype=torch.int64)
    index = torch.tensor([i for row in rows for i in row], dtype=torch.long)
    return SFTBatch(tokens, labels, loss_mask, position_ids,
                    attention_mask=packed_causal_mask(cu_seqlens, len(rows), seq_length),
                    cu_seqlens=cu_seqlens, sample_index=index)


# ---- merging ---------------------------------------------------------------------------------------------------

def _merged_cu_seqlens(batches: list[SFTBatch]) -> torch.Tensor:
    """The batches' sample boundaries over the rows of all of them, in order."""
    offset, parts = 0, [batches[0].cu_seqlens[:1]]
    for b in batches:
        parts.append(b.cu_seqlens[1:] + offset)
        offset += b.tokens.numel()
    return torch.cat(parts)


def merge_micro_batches(batches: list[SFTBatch]) -> SFTBatch:
    """One micro-batch holding the rows of `batches` in order (for a forward-only pass at a larger size)."""
    if len(batches) == 1:
        return batches[0]
    merged = {}
    for f in dataclasses.fields(SFTBatch):
        values = [getattr(b, f.name) for b in batches]
        if values[0] is None:
            merged[f.name] = None
        elif f.name == "cu_seqlens":
            merged[f.name] = _merged_cu_seqlens(batches)
        else:
            merged[f.name] = torch.cat(values)
    return SFTBatch(**merged)
