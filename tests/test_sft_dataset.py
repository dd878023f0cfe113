"""Training batches: the label shift and loss mask at sample and packing boundaries, every sample exactly once
per epoch, data-parallel sharding, resumption, and the refusals."""

import json
import os

import numpy as np
import pytest
import torch

from minorsft_megatron.data.dataset import BatchSettings, DataError, SFTBatches, SFTDataset
from minorsft_megatron.data.preprocess import PreprocessSettings, preprocess
from tests.tokenizers_for_tests import DATA, SENTENCEPIECE_MODEL

SEQ = 64
N = 1200  # records in the bundled training set


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("data") / "train")
    preprocess(PreprocessSettings(inputs=[os.path.join(DATA, "sft_train.jsonl")], tokenizer=SENTENCEPIECE_MODEL,
                                  output_prefix=prefix, chat_template="chatml", seq_length=SEQ),
               log=lambda *_: None)
    return SFTDataset(prefix)


def expected_sample(dataset, index):
    """Positions of one sample written out from the raw arrays: inputs, next-token labels, shifted mask."""
    ids, answer = dataset.tokens(index), dataset.answer_mask(index)
    n = len(ids) - 1
    return n, ids[:n], np.array([ids[t + 1] for t in range(n)]), np.array([answer[t + 1] for t in range(n)])


def test_padded_rows_shift_labels_within_each_sample(dataset):
    batches = SFTBatches(dataset, BatchSettings(SEQ, micro_batch_size=4, global_batch_size=16))
    for batch in batches.micro_batches(0):
        assert batch.cu_seqlens is None and batch.attention_mask is None
        for row, index in enumerate(batch.sample_index.tolist()):
            n, tokens, labels, mask = expected_sample(dataset, index)
            assert batch.tokens[row, :n].tolist() == tokens.tolist()
            assert batch.labels[row, :n].tolist() == labels.tolist()
            assert batch.loss_mask[row, :n].tolist() == mask.tolist()
            assert batch.loss_mask[row, n:].sum() == 0
            assert batch.position_ids[row].tolist() == list(range(SEQ))
            # the trained labels are exactly the sample's answer tokens
            ids, answer = dataset.tokens(index), dataset.answer_mask(index)
            assert batch.labels[row][batch.loss_mask[row] == 1].tolist() == ids[answer == 1].tolist()


def test_packed_rows_keep_samples_apart(dataset):
    batches = SFTBatches(dataset, BatchSettings(SEQ, micro_batch_size=3, global_batch_size=24, packing=True))
    seen_boundary = 0
    for batch in batches.micro_batches(0):
        cu = batch.cu_seqlens.tolist()
        flat = {k: getattr(batch, k).reshape(-1) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        assert cu[0] == 0 and len(cu) == len(batch.sample_index) + 1
        for k, index in enumerate(batch.sample_index.tolist()):
            n, tokens, labels, mask = expected_sample(dataset, index)
            start, end = cu[k], cu[k + 1]
            assert start + n <= end and start // SEQ == (end - 1) // SEQ  # inside one row
            assert flat["tokens"][start : start + n].tolist() == tokens.tolist()
            assert flat["labels"][start : start + n].tolist() == labels.tolist()
            assert flat["loss_mask"][start : start + n].tolist() == mask.tolist()
            assert flat["position_ids"][start : start + n].tolist() == list(range(n))
            assert flat["loss_mask"][start + n : end].sum() == 0  # a row's tail is padding
            if end % SEQ and k + 1 < len(batch.sample_index):  # the next sample starts in the same row
                seen_boundary += 1
                nxt = dataset.tokens(batch.sample_index[k + 1])
                assert end == start + n and flat["labels"][end - 1] == dataset.tokens(index)[-1]
                assert flat["tokens"][end] == nxt[0] and flat["position_ids"][end] == 0
                row, a, b = start // SEQ, start % SEQ, end % SEQ
                assert batch.attention_mask[row, 0, b, a]  # no attention across the boundary
                assert not batch.attention_mask[row, 0, b + 1, b]  # but within the sample
    assert seen_boundary > 0


@pytest.mark.parametrize("packing", [False, True])
def test_every_sample_once_per_epoch_over_ranks_and_steps(dataset, packing):
    settings = BatchSettings(SEQ, micro_batch_size=4, global_batch_size=48, packing=packing, seed=7, epochs=2)
    ranks = [SFTBatches(dataset, settings, dp_rank=r, dp_size=2) for r in range(2)]
    assert ranks[0].num_steps == 2 * N // 48
    epochs = [[], []]
    for step, per_rank in enumerate(zip(*ranks)):
        counts = {len(micro) for micro in per_rank}
        assert len(counts) == 1  # every DP rank runs the same number of micro-batches
        indices = [i for micro in per_rank for batch in micro for i in batch.sample_index.tolist()]
        assert sorted(indices) == sorted(ranks[0].global_batch(step).tolist())
        epochs[step * 48 // N].extend(indices)
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(N))
    assert epochs[0] != epochs[1]  # each epoch is shuffled afresh


def test_data_parallel_shards_are_disjoint_and_cover_the_global_batch(dataset):
    settings = BatchSettings(SEQ, micro_batch_size=2, global_batch_size=24, seed=3)
    shards = [torch.cat([mb.sample_index for mb in SFTBatches(dataset, settings, dp_rank=r, dp_size=4).micro_batches(5)])
              for r in range(4)]
    together = np.concatenate(shards)
    assert len(set(together.tolist())) == 24
    assert together.tolist() == SFTBatches(dataset, settings).global_batch(5).tolist()


def test_same_seed_same_order_other_seed_other_order(dataset):
    a = SFTBatches(dataset, BatchSettings(SEQ, 2, 16, seed=1)).global_batch(3)
    b = SFTBatches(dataset, BatchSettings(SEQ, 2, 16, seed=1)).global_batch(3)
    c = SFTBatches(dataset, BatchSettings(SEQ, 2, 16, seed=2)).global_batch(3)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


@pytest.mark.parametrize("packing", [False, True])
def test_resume_from_consumed_samples_continues_the_stream(dataset, packing):
    settings = BatchSettings(SEQ, micro_batch_size=2, global_batch_size=40, packing=packing, epochs=2)
    straight = list(SFTBatches(dataset, settings, dp_rank=1, dp_size=2))
    resumed = list(SFTBatches(dataset, settings, dp_rank=1, dp_size=2, consumed_samples=40 * 37))
    assert len(resumed) == len(straight) - 37 > 0
    for want, got in zip(straight[37:], resumed):
        for a, b in zip(want, got):
            for key, value in a.__dict__.items():
                assert (value is None and getattr(b, key) is None) or torch.equal(value, getattr(b, key))


def test_refusals(dataset, tmp_path):
    with pytest.raises(DataError, match=r"samples have more than seq_length \+ 1 = 33 tokens"):
        SFTBatches(dataset, BatchSettings(32, 2, 16))
    with pytest.raises(DataError, match=r"global_batch_size 20 is not a multiple of .* \(8\)"):
        SFTBatches(dataset, BatchSettings(SEQ, 4, 20), dp_size=2)
    with pytest.raises(DataError, match="not a multiple of global_batch_size"):
        SFTBatches(dataset, BatchSettings(SEQ, 2, 16), consumed_samples=17)
    with pytest.raises(DataError, match="less than one global batch"):
        SFTBatches(dataset, BatchSettings(SEQ, 2, 2048))
    with pytest.raises(DataError, match="no such file"):
        SFTDataset(str(tmp_path / "nothing"))
    meta = dict(dataset.meta, counts=dict(dataset.meta["counts"], samples=N + 1))
    link = tmp_path / "train"
    for suffix in ("_tokens.bin", "_tokens.idx", "_answer_mask.bin", "_answer_mask.idx"):
        os.symlink(dataset.prefix + suffix, str(link) + suffix)
    (tmp_path / "train.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="the sidecar says 1201"):
        SFTDataset(str(link))


@pytest.mark.parametrize("packing", [False, True])
def test_merged_micro_batches_give_the_same_per_sample_sums(dataset, packing):
    """merge_micro_batches (the co-located reference's larger forward) keeps every sample's sum and order."""
    from minorsft_megatron.data.batch import merge_micro_batches
    from minorsft_megatron.logprobs import sequence_sums

    batches = SFTBatches(dataset, BatchSettings(SEQ, 2, 24, packing=packing, seed=5)).micro_batches(1)
    assert len(batches) >= 2
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(b.tokens.shape, generator=gen, dtype=torch.float64) for b in batches]
    separate = torch.cat([sequence_sums(v, b.loss_mask, b.position_sample_ids(), b.num_samples)
                          for v, b in zip(values, batches)])
    merged = merge_micro_batches(batches)
    assert torch.equal(merged.sample_index, torch.cat([b.sample_index for b in batches]))
    together = sequence_sums(torch.cat(values), merged.loss_mask, merged.position_sample_ids(), merged.num_samples)
    torch.testing.assert_close(together, separate, rtol=0, atol=1e-12)
    if packing:
        assert merged.attention_mask.shape == (merged.tokens.size(0), 1, SEQ, SEQ)
