"""Vocab-parallel log-probs, per-sequence sums, packing and context parallelism against float64 references."""

import pytest
import torch

from minorsft_megatron.data.batch import sample_ids
from minorsft_megatron.logprobs import OutputLogProbs, sequence_sums, vocab_parallel_log_probs
from minorsft_megatron.model import padded_vocab_size
from tests.distributed import spawn
from tests.logprob_workers import context_parallel, vocab_parallel

VOCAB = 50  # not divisible by 4 (or by 3)


def worker_device(device, world):
    return device if device == "cuda" and torch.cuda.device_count() >= world else "cpu"


def make_logits(padded, seed=0, s=6, b=3):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, b, padded, generator=gen, dtype=torch.float64) * 4
    logits[..., VOCAB:] = 1e4  # padding columns hold garbage; they must take no probability
    labels = torch.randint(0, VOCAB, (s, b), generator=gen)
    upstream = torch.randn(s, b, generator=gen, dtype=torch.float64)
    return logits, labels, upstream


def float64_reference(logits, labels, upstream):
    logits = logits.clone().requires_grad_()
    logp = torch.log_softmax(logits[..., :VOCAB], dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (logp * upstream).sum().backward()
    return logp.detach(), logits.grad


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_log_probs_and_gradients(tmp_path, device, tp):
    padded = padded_vocab_size(VOCAB, tp, divisible_by=1)  # 50, 50, 52: the last TP=4 shard is part padding
    logits, labels, upstream = make_logits(padded, seed=tp)
    expected_logp, expected_grad = float64_reference(logits, labels, upstream)
    results = spawn(
        tp, vocab_parallel, tp, worker_device(device, tp), logits.float(), labels, upstream.float(), VOCAB,
        torch.float32, out_dir=tmp_path,
    )
    grad = torch.cat([r["grad"] for r in sorted(results, key=lambda r: r["rank"])], dim=-1)
    for r in results:
        assert r["logp"].dtype == torch.float32
        torch.testing.assert_close(r["logp"].double(), expected_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)
    assert torch.all(grad[..., VOCAB:] == 0)


def test_bf16_logits_use_fp32_math(tmp_path, device):
    logits, labels, upstream = make_logits(padded_vocab_size(VOCAB, 2, divisible_by=1), seed=7)
    logits_bf16 = logits.to(torch.bfloat16)
    expected_logp, _ = float64_reference(logits_bf16.double(), labels, upstream)
    results = spawn(
        2, vocab_parallel, 2, worker_device(device, 2), logits_bf16, labels, upstream.float(), VOCAB,
        torch.bfloat16, out_dir=tmp_path,
    )
    for r in results:
        assert r["logp"].dtype == torch.float32 and r["grad_dtype"] == torch.bfloat16
        # fp32 math on bf16 inputs: as exact as fp32, far tighter than bf16's 8 bits
        torch.testing.assert_close(r["logp"].double(), expected_logp, rtol=1e-5, atol=1e-5)


def test_single_process_needs_no_group():
    logits, labels, upstream = make_logits(64)
    expected_logp, expected_grad = float64_reference(logits, labels, upstream)
    x = logits.float().requires_grad_()
    logp = vocab_parallel_log_probs(x, labels, vocab_size=VOCAB)
    (logp * upstream.float()).sum().backward()
    torch.testing.assert_close(logp.double(), expected_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), expected_grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(x.detach(), logits.float()), "the caller's logits must not be modified"


def test_shape_and_vocab_errors():
    with pytest.raises(ValueError, match=r"logits \(4, 2, 8\) and labels \(4, 3\) disagree"):
        vocab_parallel_log_probs(torch.zeros(4, 2, 8), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"vocab_size 9 is not in \(0, 8\]"):
        vocab_parallel_log_probs(torch.zeros(4, 2, 8), torch.zeros(4, 2, dtype=torch.long), vocab_size=9)


def test_packed_sums_equal_unpacked():
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 3, 7, 4]
    rows = [torch.randn(n, generator=gen, dtype=torch.float64) for n in lengths]
    masks = [(torch.rand(n, generator=gen) > 0.3).double() for n in lengths]
    masks[1][:] = 0  # a sample with no answer token
    # Unpacked: one sample per row, right-padded to 8.
    padded = torch.zeros(4, 8, dtype=torch.float64)
    padded_mask = torch.zeros(4, 8, dtype=torch.float64)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        padded[i, : len(row)], padded_mask[i, : len(row)] = row, mask
    padded.requires_grad_()
    unpacked = sequence_sums(padded, padded_mask, torch.arange(4)[:, None].expand(4, 8), 4)
    # Packed: two rows of 12, [5, 3] + padding and [7, 4] + padding.
    packed = torch.zeros(2, 12, dtype=torch.float64)
    packed_mask = torch.zeros(2, 12, dtype=torch.float64)
    packed[0, :8], packed_mask[0, :8] = torch.cat(rows[:2]), torch.cat(masks[:2])
    packed[1, :11], packed_mask[1, :11] = torch.cat(rows[2:]), torch.cat(masks[2:])
    packed[0, 8:] = 99.0  # padding values must not leak into any sample
    packed_mask[0, 8:] = 1.0
    # Flattened [2 * 12] layout: samples at [0, 5), [5, 8), [12, 19), [19, 23); 8..12 and 23.. are padding.
    cu_seqlens = torch.tensor([0, 5, 8, 12, 19, 23])
    packed.requires_grad_()
    sums = sequence_sums(packed, packed_mask, sample_ids(cu_seqlens, 24).view(2, 12), 5)  # [8, 12) is bin 2
    keep = [0, 1, 3, 4]
    expected = torch.stack([(r * m).sum() for r, m in zip(rows, masks)])
    torch.testing.assert_close(unpacked, expected)
    torch.testing.assert_close(sums[keep], expected)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    (unpacked * upstream).sum().backward()
    (sums[keep] * upstream).sum().backward()
    torch.testing.assert_close(packed.grad[0, :8], torch.cat([padded.grad[0, :5], padded.grad[1, :3]]))
    torch.testing.assert_close(packed.grad[1, :11], torch.cat([padded.grad[2, :7], padded.grad[3, :4]]))
    assert torch.all(packed.grad[1, 11:] == 0)


def test_trailing_padding_is_no_sample():
    values = torch.ones(1, 10)
    sums = sequence_sums(values, torch.ones(1, 10), sample_ids(torch.tensor([0, 4, 7]), 10).view(1, 10), 2)
    assert sums.tolist() == [4.0, 3.0]


def test_sums_shape_mismatch():
    with pytest.raises(ValueError, match=r"token values \(2, 5\) and loss mask \(2, 4\) disagree"):
        sequence_sums(torch.zeros(2, 5), torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long), 2)


@pytest.mark.parametrize("loss", ["minor_sft", "sft"])
def test_context_parallel_sums_and_gradients(tmp_path, device, loss):
    """Sequences split over CP = 2 ranks: the same sums, denominator and logits gradient as unsplit."""
    from minorsft_megatron.data.batch import SFTBatch
    from minorsft_megatron.forward_step import SFTLossFunction

    gen = torch.Generator().manual_seed(3)
    b, s, v = 3, 8, 11
    logits = torch.randn(b, s, v, generator=gen, dtype=torch.float64)
    batch = {
        "tokens": torch.randint(0, v, (b, s), generator=gen),
        "labels": torch.randint(0, v, (b, s), generator=gen),
        "loss_mask": (torch.rand(b, s, generator=gen) > 0.4).float(),
        "ref_logp_sum": torch.randn(b, generator=gen) * 3 - 10,
    }
    batch["loss_mask"][1] = 0  # m = 0 row
    # Unsplit float64 reference through the same loss function, single process.
    ref_logits = logits.clone().requires_grad_()
    ref_batch = SFTBatch(position_ids=None, **{k: (x.double() if x.is_floating_point() else x) for k, x in batch.items()})
    ref_loss, ref_den, ref_stats = SFTLossFunction(loss, 0.04, OutputLogProbs(v))(ref_batch, ref_logits)
    ref_loss.backward()

    results = spawn(2, context_parallel, 2, worker_device(device, 2), batch, logits.float(), loss, out_dir=tmp_path)
    assert sum(r["denominator"] for r in results) == int(ref_den)  # counted once per CP group
    grad = torch.zeros_like(logits)
    for r in results:
        torch.testing.assert_close(r["logp_sum"].double(), ref_stats["logp_sum"], rtol=1e-5, atol=1e-5)
        assert torch.equal(r["num_answer_tokens"], ref_stats["num_answer_tokens"])
        assert torch.equal(r["plain_counts"], batch["loss_mask"].sum(-1))
        torch.testing.assert_close(r["loss_sum"].double(), ref_loss.detach(), rtol=1e-5, atol=1e-5)
        grad[:, r["positions"]] += r["grad"].double()
    # Each rank's gradient is its slice of the unsplit gradient; megatron-core then sums parameter grads over CP.
    torch.testing.assert_close(grad, ref_logits.grad, rtol=1e-5, atol=1e-6)


def test_masked_positions_cannot_make_nan():
    """A non-finite value at a masked position (a padding position's garbage, a padded-vocabulary -inf) stays
    out of the sums and of the gradients: selection, not multiplication by 0."""
    values = torch.tensor([[1.0, float("nan"), 2.0, float("-inf")], [float("inf"), 3.0, 4.0, 0.5]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    ids = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 2]])  # the last position belongs to no sample
    assert sequence_sums(values, mask, ids, 2).tolist() == [3.0, 7.0]
    logits = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    logits[0, 1] = float("nan")  # a masked position whose logits are garbage
    logits.requires_grad_()
    labels = torch.randint(0, 8, (2, 3), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.ones(2, 3)
    loss_mask[0, 1] = 0
    logp = vocab_parallel_log_probs(logits, labels)
    total = sequence_sums(logp, loss_mask, torch.arange(2)[:, None].expand(2, 3), 2).sum()
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logits.grad).all() and (logits.grad[0, 1] == 0).all()
