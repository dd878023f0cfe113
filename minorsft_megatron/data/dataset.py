"""Training batches from a preprocessed SFT dataset: padded or packed rows, shuffled by seed, sharded over DP.

This module decides which samples go where; data/batch.py turns them into micro-batch tensors. Rows hold
`seq_length` positions (a sample of n tokens fills n - 1 of them).

The sample stream is epoch 0's permutation of all samples, then epoch 1's, ... (each drawn from `seed` and
the epoch number). Step k's global batch is stream positions [k*G, (k+1)*G); data-parallel rank r takes the
r-th contiguous G/dp of them. Padded: micro-batches of `micro_batch_size` rows, one sample each. Packed:
the rank's samples go into rows by first-fit decreasing (no sample crosses a row); `micro_batch_size` rows
per micro-batch; every DP rank runs as many micro-batches as the rank that needs most, padding with empty
rows. The global batch, and so the loss, is the same set of samples either way. Resuming from
`consumed_samples` (a multiple of G) continues the same stream.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from minorsft_megatron.errors import UserError
from minorsft_megatron.data.batch import SFTBatch, packed_micro_batch, padded_micro_batch, thd_micro_batch


class DataError(UserError):
    """A dataset or batch setting that cannot work; one line naming the file or key."""


class SFTDataset:
    """The samples written by tools/preprocess_sft_data.py, memory-mapped through megatron-core IndexedDataset.

    `tokens(i)` int64 `[n_i]`, `answer_mask(i)` uint8 `[n_i]`, `lengths` int64 `[N]` tokens per sample.
    """

    def __init__(self, prefix: str):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = prefix
        self.meta = read_sidecar(prefix)
        files = {k: os.path.join(os.path.dirname(prefix), v) for k, v in self.meta["files"].items()}
        for name in files.values():
            if not IndexedDataset.exists(name):
                raise DataError(f"{name}.bin/.idx: missing (the sidecar {prefix}.json names them)")
        self._tokens = IndexedDataset(files["tokens"])
        self._answer_mask = IndexedDataset(files["answer_mask"])
        self.lengths = self._tokens.sequence_lengths.astype(np.int64)
        self._check_against_sidecar()

    def _check_against_sidecar(self) -> None:
        counts = self.meta["counts"]
        found = (len(self._tokens), int(self.lengths.sum()))
        expected = (counts["samples"], counts["tokens"])
        if found != expected or not np.array_equal(self._answer_mask.sequence_lengths, self._tokens.sequence_lengths):
            raise DataError(
                f"{self.prefix}: files hold {found[0]} samples / {found[1]} tokens, the sidecar says "
                f"{expected[0]} / {expected[1]}, or tokens and masks disagree; preprocess again"
            )

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def tokens(self, i: int) -> np.ndarray:
        return self._tokens[int(i)].astype(np.int64)

    def answer_mask(self, i: int) -> np.ndarray:
        return self._answer_mask[int(i)]


def read_sidecar(prefix: str) -> dict:
    path = f"{prefix}.json"
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (preprocess with tools/preprocess_sft_data.py first)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a valid sidecar: {err}")
    for key in ("fingerprint", "counts", "files"):
        if key not in meta:
            raise DataError(f"{path}: not a valid sidecar: '{key}' is missing")
    return meta


@dataclass(frozen=True)
class BatchSettings:
    seq_length: int
    """Positions per row; every sample must have at most seq_length + 1 tokens."""
    micro_batch_size: int
    """Rows per micro-batch."""
    global_batch_size: int
    """Samples per optimizer step, over all data-parallel ranks."""
    packing: bool = False
    """Pack several samples per row (with cu_seqlens) instead of one padded sample per row."""
    seed: int = 1234
    """Shuffling seed."""
    epochs: int = 1
    """Passes over the dataset; the last incomplete global batch is left out."""
    thd_sample_multiple: int | None = None
    """Packed only: build THD micro-batches ([1, T], for Transformer Engine's attention) of the samples each group
    of micro_batch_size rows holds, each padded to a multiple of this (2 * cp, times tp under sequence
    parallelism). None: packed rows [b, s] with a block-diagonal mask (the local spec)."""
    thd_total_multiple: int = 1
    """THD micro-batches' length T is a multiple of this (a multiple of thd_sample_multiple; FP8 GEMMs need their
    token count divisible by 16 or 32)."""


def sample_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of sample indices used in `epoch`."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_samples)


def first_fit_decreasing(positions: np.ndarray, capacity: int) -> list[list[int]]:
    """Rows of item indices, each row's `positions` summing to at most `capacity`. Deterministic."""
    rows, room = [], []
    for item in np.argsort(-positions, kind="stable"):
        need = int(positions[item])
        row = next((r for r, free in enumerate(room) if free >= need), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(int(item))
        room[row] -= need
    return [sorted(row) for row in rows]


class SFTBatches:
    """Iterates over optimizer steps; each step is this DP rank's list of `SFTBatch` micro-batches (on CPU)."""

    def __init__(self, dataset: SFTDataset, settings: BatchSettings, dp_rank: int = 0, dp_size: int = 1,
                 consumed_samples: int = 0):
        self.dataset, self.settings = dataset, settings
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._orders: dict[int, np.ndarray] = {}
        check_batch_settings(dataset, settings, dp_size)
        if consumed_samples % settings.global_batch_size:
            raise DataError(
                f"consumed_samples {consumed_samples} is not a multiple of global_batch_size "
                f"{settings.global_batch_size}"
            )
        self.start_step = consumed_samples // settings.global_batch_size
        self.num_steps = len(dataset) * settings.epochs // settings.global_batch_size

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: sample_order(len(self.dataset), self.settings.seed, epoch)}  # keep one
        return self._orders[epoch]

    def global_batch(self, step: int) -> np.ndarray:
        """`[G]` dataset indices of step `step`'s global batch."""
        size, n = self.settings.global_batch_size, len(self.dataset)
        positions = np.arange(step * size, (step + 1) * size)
        return np.array([self._order(int(p // n))[p % n] for p in positions], dtype=np.int64)

    def _shards(self, step: int) -> list[np.ndarray]:
        """Every DP rank's contiguous share of step `step`'s global batch."""
        per_rank = self.settings.global_batch_size // self.dp_size
        batch = self.global_batch(step)
        return [batch[rank * per_rank : (rank + 1) * per_rank] for rank in range(self.dp_size)]

    def micro_batches(self, step: int) -> list[SFTBatch]:
        """This rank's micro-batches for step `step`."""
        return rank_micro_batches(self.dataset, self.settings, self._shards(step), self.dp_rank)

    def __len__(self) -> int:
        return self.num_steps - self.start_step

    def __iter__(self):
        for step in range(self.start_step, self.num_steps):
            yield self.micro_batches(step)


def rank_micro_batches(dataset: SFTDataset, settings: BatchSettings, shards: list[np.ndarray],
                       dp_rank: int) -> list[SFTBatch]:
    """Rank `dp_rank`'s micro-batches of `shards` (every DP rank's samples, in order). Every rank runs as many
    micro-batches as the rank that needs most, the others filling theirs with rows of padding alone (no answer
    token: they add nothing to any sum)."""
    mbs = settings.micro_batch_size
    if not settings.packing:
        num_rows = -(-max(len(shard) for shard in shards) // mbs) * mbs
        samples = list(shards[dp_rank]) + [-1] * (num_rows - len(shards[dp_rank]))  # -1: a row of padding alone
        return [padded_micro_batch(dataset, samples[i : i + mbs], settings.seq_length)
                for i in range(0, num_rows, mbs)]
    rows_per_rank = [packed_rows(dataset, shard, settings.seq_length) for shard in shards]  # to agree on a count
    rows = rows_per_rank[dp_rank]
    num_micro = -(-max(len(r) for r in rows_per_rank) // mbs)
    rows += [[]] * (num_micro * mbs - len(rows))
    groups = [rows[i : i + mbs] for i in range(0, len(rows), mbs)]
    if settings.thd_sample_multiple is None:
        return [packed_micro_batch(dataset, group, settings.seq_length) for group in groups]
    return [thd_micro_batch(dataset, [i for row in group for i in row], settings.thd_sample_multiple,
                            settings.thd_total_multiple) for group in groups]


def packed_rows(dataset: SFTDataset, samples: np.ndarray, seq_length: int) -> list[list[int]]:
    """`samples` packed into rows of `seq_length` positions by first-fit decreasing."""
    positions = dataset.lengths[samples] - 1
    return [[int(samples[i]) for i in row] for row in first_fit_decreasing(positions, seq_length)]


def held_out_micro_batches(dataset: SFTDataset, settings: BatchSettings, num_samples: int, dp_rank: int,
                           dp_size: int) -> list[SFTBatch]:
    """This DP rank's micro-batches of the first `num_samples` samples, in sample order (no shuffling): rank r takes
    the r-th contiguous ceil(num_samples / dp_size) of them, packed or padded as `settings` say."""
    per_rank = -(-num_samples // dp_size)
    shards = [np.arange(r * per_rank, min((r + 1) * per_rank, num_samples)) for r in range(dp_size)]
    return rank_micro_batches(dataset, settings, shards, dp_rank)


def check_samples_fit(dataset: SFTDataset, seq_length: int, where: str) -> None:
    """Every sample of `dataset` fits in a row of `seq_length` positions; DataError naming `where` otherwise."""
    too_long = dataset.lengths > seq_length + 1
    if too_long.any():
        raise DataError(
            f"{where}: {int(too_long.sum())} samples have more than seq_length + 1 = "
            f"{seq_length + 1} tokens (longest {int(dataset.lengths.max())}); preprocess with "
            f"--seq-length {seq_length} or raise seq_length"
        )


def check_batch_settings(dataset: SFTDataset, s: BatchSettings, dp_size: int) -> None:
    """Refuse settings that cannot give whole global batches, naming the key."""
    for key in ("seq_length", "micro_batch_size", "global_batch_size", "epochs"):
        if getattr(s, key) < 1:
            raise DataError(f"{key} must be at least 1, got {getattr(s, key)}")
    divisor = dp_size if s.packing else dp_size * s.micro_batch_size
    if s.global_batch_size % divisor:
        what = "data-parallel size" if s.packing else "micro_batch_size x data-parallel size"
        raise DataError(f"global_batch_size {s.global_batch_size} is not a multiple of {what} ({divisor})")
    check_samples_fit(dataset, s.seq_length, dataset.prefix)
    if len(dataset) * s.epochs < s.global_batch_size:
        raise DataError(
            f"{dataset.prefix}: {len(dataset)} samples x {s.epochs} epochs is less than one global batch "
            f"({s.global_batch_size})"
        )
