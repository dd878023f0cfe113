"""Context parallelism and THD packing through the real forward step, on CPU.

The model is a stand-in whose logits at each position depend only on that position's token: a learnable [V, V]
table gives each token's hidden state, and a learnable output weight [V, V] its logits (no attention, so CPU
processes can run what on GPUs needs Transformer Engine's attention). It returns the logits, or (fused) the
hidden states for the package's chunked output layer + log-probs. Every other part is the package's and
megatron-core's own: the micro-batch builders, the context-parallel split inside the forward step, the loss
function, megatron-core's schedule, DDP and finalize_model_grads. At CP = 1 and CP = 2, rows and THD, logits and
fused, the per-sample sums, counts, losses and gradients must equal a float64 computation written here.
"""

import itertools

import numpy as np
import pytest
import torch

from tests.distributed import spawn

VOCAB, SEQ = 13, 16
LOSSES = ("minor_sft", "sft", "dft", "iw_sft", "iw_sft_token", "asft", "sft_kl")
KL = ("asft", "sft_kl")
"""Losses reading the reference's whole distribution: the fused head only, the reference's hidden states kept."""
KL_COEF = 0.1
SCORED = ("iw_sft", "iw_sft_token") + KL
"""The losses whose reference inputs come from a second stand-in scored through reference.score_into (per-token
log-probs too, under CP scattered back to the full layout; two micro-batches merged into one)."""
BETA = 0.04


class Samples:
    """A dataset of fixed samples (tokens and answer masks), as SFTDataset serves them."""

    def __init__(self, seed: int = 0):
        gen = np.random.default_rng(seed)
        # odd lengths, very short ones (2 tokens: one position; 3 tokens), one without an answer token
        lengths = [9, 2, 17, 5, 3, 12, 7, 16]
        self._tokens = [gen.integers(0, VOCAB, n).astype(np.int64) for n in lengths]
        self._masks = []
        for i, n in enumerate(lengths):
            mask = np.zeros(n, dtype=np.uint8)
            mask[max(1, n // 3):] = 1
            if i == 5:
                mask[:] = 0
            self._masks.append(mask)
        self.lengths = np.array(lengths, dtype=np.int64)
        self.ref_logp_sum = gen.normal(-8.0, 3.0, len(lengths))

    def __len__(self):
        return len(self.lengths)

    def tokens(self, i):
        return self._tokens[int(i)]

    def answer_mask(self, i):
        return self._masks[int(i)]


def stand_in_log_probs(samples: Samples, table, out, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i's per-position label log-probs under the stand-in (float64), and its answer mask."""
    ids = torch.from_numpy(samples.tokens(i))
    mask = torch.from_numpy(samples.answer_mask(i)[1:].astype(np.float64))
    return (table[ids[:-1]] @ out.t()).log_softmax(-1).gather(-1, ids[1:, None])[:, 0], mask


def stand_in_kl(samples: Samples, table, out, ref_table, ref_out, i: int) -> torch.Tensor:
    """KL(pi_ref || pi_theta) over the whole vocabulary at each of sample i's positions (float64)."""
    ids = torch.from_numpy(samples.tokens(i))[:-1]
    log_p, log_r = (table[ids] @ out.t()).log_softmax(-1), (ref_table[ids] @ ref_out.t()).log_softmax(-1)
    return (log_r.exp() * (log_r - log_p)).sum(-1)


def expected(samples: Samples, table: torch.Tensor, out: torch.Tensor, loss: str, ref_table, ref_out):
    """float64: per-sample answer log-prob sums and counts, the loss over all samples, d loss / d (table, out)."""
    table = table.double().clone().requires_grad_()
    out = out.double().clone().requires_grad_()
    sums, counts, token_terms, ref_sums = [], [], [], []
    for i in range(len(samples)):
        logp, mask = stand_in_log_probs(samples, table, out, i)
        ref_logp = stand_in_log_probs(samples, ref_table, ref_out, i)[0]
        sums.append((logp * mask).sum())
        ref_sums.append((ref_logp * mask).sum())
        counts.append(int(mask.sum()))
        if loss == "dft":  # sg(p_t) * -log p_t
            token_terms.append(-(logp.detach().exp() * logp)[mask.bool()])
        if loss == "iw_sft_token":  # clamp(p_t / p_ref,t, 0.2, 1.8) * -log p_t
            token_terms.append(-((logp.detach() - ref_logp).exp().clamp(0.2, 1.8) * logp)[mask.bool()])
        if loss in KL:  # DFT's term (asft) or the NLL (sft_kl), plus lambda KL(pi_ref || pi_theta)
            kl = stand_in_kl(samples, table, out, ref_table, ref_out, i)
            nll = -(logp.detach().exp() * logp) if loss == "asft" else -logp
            token_terms.append((nll + KL_COEF * kl)[mask.bool()])
    logp_sum, m = torch.stack(sums), torch.tensor(counts, dtype=torch.float64)
    valid = m > 0
    ref = torch.stack(ref_sums) if loss in SCORED else torch.from_numpy(samples.ref_logp_sum)
    if loss == "sft":
        value = -logp_sum[valid].sum() / m[valid].sum()
    elif loss in ("dft", "iw_sft_token") + KL:
        value = torch.cat(token_terms).sum() / m.sum()
    elif loss == "iw_sft":  # clamp(exp(D / m), 0, 16) on the summed NLL
        value = -(torch.exp((logp_sum.detach() - ref) / m.clamp(min=1)).clamp(max=16) * logp_sum)[valid].sum() / m.sum()
    else:
        weight = 2 * torch.sigmoid(-BETA * (logp_sum.detach() - ref))
        value = -(weight * logp_sum / m.clamp(min=1))[valid].mean()
    value.backward()
    return logp_sum.detach(), torch.tensor(counts), value.detach(), table.grad, out.grad


def micro_batches(samples: Samples, layout: str, cp: int):
    """All samples in two micro-batches: padded rows of SEQ positions, or THD (padded to multiples of 2 * cp)."""
    from minorsft_megatron.data.batch import padded_micro_batch, thd_micro_batch

    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    if layout == "rows":
        batches = [padded_micro_batch(samples, group, SEQ) for group in groups]
    else:
        batches = [thd_micro_batch(samples, group, 2 * cp, 2 * cp) for group in groups]
    for batch, group in zip(batches, groups):
        batch.ref_logp_sum = torch.from_numpy(samples.ref_logp_sum[group])
    return batches


def cp_steps(cp: int, table: torch.Tensor, out: torch.Tensor, ref_table: torch.Tensor, ref_out: torch.Tensor) -> dict:
    """{(layout, head, loss): one forward-backward of `loss` over all samples at this CP size and layout, the
    log-probs from the stand-in's logits or fused from its hidden states (3 positions a time)."""
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    from minorsft_megatron import parallel
    from minorsft_megatron.device import setup_device
    from minorsft_megatron.forward_step import LogProbCollector, SFTLossFunction, forward_backward, reduce_step_metrics
    from minorsft_megatron.reference import score_into
    from minorsft_megatron.logprobs import OutputLogProbs

    from megatron.core.enums import ModelType

    class TokenTable(MegatronModule):
        def __init__(self, config, table, out):
            super().__init__(config)
            self.model_type = ModelType.encoder_or_decoder
            self.table = torch.nn.Parameter(table.clone())
            self.out = torch.nn.Parameter(out.clone())
            self.hidden_states_out = False

        def set_input_tensor(self, tensor):
            pass

        def forward(self, tokens, position_ids, attention_mask, packed_seq_params=None):
            hidden = self.table[tokens]  # [b, s, V]: each position from its own token
            return hidden if self.hidden_states_out else hidden @ self.out.t()

    device = setup_device("cpu")
    pgs = parallel.initialize(device, cp=cp)
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, context_parallel_size=cp,
                               params_dtype=torch.float64, calculate_per_token_loss=True, activation_func=F.silu)
    config.finalize_model_grads_func = finalize_model_grads
    model, reference = TokenTable(config, table, out), TokenTable(config, ref_table, ref_out)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=False), model)
    heads = {"logits": OutputLogProbs(VOCAB, pgs.tp),
             "fused": OutputLogProbs(VOCAB, pgs.tp, chunk_size=3, weight=lambda: model.out)}
    ref_heads = {"logits": OutputLogProbs(VOCAB, pgs.tp),
                 "fused": OutputLogProbs(VOCAB, pgs.tp, chunk_size=3, weight=lambda: reference.out)}
    results = {}
    for (layout, head), loss in itertools.product(itertools.product(("rows", "thd"), heads), LOSSES):
        if loss in KL and head == "logits":
            continue
        model.hidden_states_out = reference.hidden_states_out = head == "fused"
        batches = micro_batches(Samples(), layout, cp)
        if loss in SCORED:
            collector = LogProbCollector(ref_heads[head], pgs.cp, keep_token_log_probs=True, keep_hidden=loss in KL)
            score_into(batches, reference, collector, batches[0].tokens.size(1), batches[0].tokens.size(0),
                       merge=1 if loss in KL else 2)
        loss_fn = SFTLossFunction(loss, BETA, heads[head], pgs.cp, KL_COEF, ref_heads[head])
        ddp.zero_grad_buffer()
        stats = forward_backward([ddp], batches, loss_fn, batches[0].tokens.size(1), batches[0].tokens.size(0))
        metrics = reduce_step_metrics(stats, pgs.dp_cp, has_reference=True)
        results[layout, head, loss] = {"logp_sum": torch.cat([d["logp_sum"] for d in stats]),
                                       "num_answer_tokens": torch.cat([d["num_answer_tokens"] for d in stats]),
                                       "loss": metrics["loss"], "grad": model.table.main_grad.clone(),
                                       "out_grad": model.out.main_grad.clone()}
    return results


@pytest.mark.parametrize("cp", [1, 2])
def test_context_parallel_forward_step_equals_float64(tmp_path, cp):
    """Rows and THD micro-batches, logits and fused log-probs, every loss (iw_sft's and iw_sft_token's reference
    scored by a second stand-in through reference.score_into), every CP rank: the float64 sums, counts, loss and
    gradients of both parameters."""
    gen = torch.Generator().manual_seed(5)
    table = torch.randn(VOCAB, VOCAB, generator=gen, dtype=torch.float64)
    out = torch.randn(VOCAB, VOCAB, generator=gen, dtype=torch.float64) * 0.5
    ref_table = table + 0.3 * torch.randn(VOCAB, VOCAB, generator=gen, dtype=torch.float64)
    ref_out = out + 0.3 * torch.randn(VOCAB, VOCAB, generator=gen, dtype=torch.float64)
    ranks = spawn(cp, cp_steps, cp, table, out, ref_table, ref_out, out_dir=tmp_path)
    for loss in LOSSES:
        want_sums, want_counts, want_loss, want_grad, want_out_grad = expected(Samples(), table, out, loss, ref_table,
                                                                               ref_out)
        for rank in ranks:
            for (layout, head, name), got in rank.items():
                if name != loss:
                    continue
                assert torch.equal(got["num_answer_tokens"], want_counts), (layout, head, loss)
                torch.testing.assert_close(got["logp_sum"], want_sums, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(got["loss"], want_loss, rtol=1e-12, atol=1e-12)
                # megatron-core divides gradients by the global denominator as a float32 1 / N: 6e-8 relative at most
                torch.testing.assert_close(got["grad"], want_grad, rtol=1e-7, atol=1e-12)
                torch.testing.assert_close(got["out_grad"], want_out_grad, rtol=1e-7, atol=1e-12)


def test_thd_micro_batch_against_each_sample():
    """Where every sample lands in a THD micro-batch, checked sample by sample: its tokens, labels (never
    crossing into the next sample), loss mask, sample ids, and the padded and unpadded cu_seqlens."""
    from minorsft_megatron.data.batch import thd_micro_batch

    samples, order = Samples(), [2, 0, 4, 1, 7]
    batch = thd_micro_batch(samples, order, 4, 32)
    total = batch.tokens.size(1)
    lengths = [len(samples.tokens(i)) - 1 for i in order]
    padded = [-(-n // 4) * 4 for n in lengths]
    assert total % 32 == 0 and total >= sum(padded) and batch.tokens.shape == (1, total)
    starts = np.cumsum([0] + padded)
    tail = total - starts[-1]
    assert batch.thd.cu_seqlens.tolist() == list(np.cumsum([0] + lengths + ([tail] if tail else [])))
    assert batch.thd.cu_seqlens_padded.tolist() == list(starts) + ([total] if tail else [])
    assert batch.thd.cu_seqlens.dtype == batch.thd.cu_seqlens_padded.dtype == torch.int32
    assert batch.thd.max_seqlen == max(padded + ([tail] if tail else []))
    assert batch.sample_index.tolist() == order and batch.num_samples == len(order)
    for j, (i, n, start) in enumerate(zip(order, lengths, starts)):
        ids, mask = samples.tokens(i), samples.answer_mask(i)
        span = slice(start, start + padded[j])
        assert batch.tokens[0, start : start + n].tolist() == ids[:-1].tolist()
        assert batch.labels[0, start : start + n].tolist() == ids[1:].tolist()
        assert batch.loss_mask[0, start : start + n].tolist() == mask[1:].astype(float).tolist()
        assert batch.loss_mask[0, start + n : start + padded[j]].sum() == 0
        assert batch.labels[0, start + n : start + padded[j]].sum() == 0
        assert (batch.sample_id[0, span] == j).all()
        assert batch.position_ids[0, span].tolist() == list(range(padded[j]))
    assert (batch.sample_id[0, starts[-1]:] == len(order)).all() and batch.loss_mask[0, starts[-1]:].sum() == 0


def test_thd_context_parallel_share_is_each_sequences_two_chunks(tmp_path):
    """CP rank r of 2 keeps chunks r and 3 - r of every THD sequence (Transformer Engine's THD split)."""
    results = spawn(2, _thd_shares, out_dir=tmp_path)
    from minorsft_megatron.data.batch import thd_micro_batch

    full = thd_micro_batch(Samples(), [2, 0, 4, 1, 7], 4, 8)
    bounds = full.thd.cu_seqlens_padded.tolist()
    for rank, share in enumerate(results):
        keep = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            chunk = (b - a) // 4
            keep += list(range(a + rank * chunk, a + (rank + 1) * chunk))
            keep += list(range(a + (3 - rank) * chunk, a + (4 - rank) * chunk))
        for key in ("tokens", "labels", "loss_mask", "position_ids", "sample_id"):
            assert torch.equal(share[key], getattr(full, key)[:, keep]), (rank, key)


def _thd_shares():
    from minorsft_megatron import parallel
    from minorsft_megatron.data.batch import context_parallel_share, thd_micro_batch
    from minorsft_megatron.device import setup_device

    pgs = parallel.initialize(setup_device("cpu"), cp=2)
    share = context_parallel_share(thd_micro_batch(Samples(), [2, 0, 4, 1, 7], 4, 8), pgs.cp)
    return {k: getattr(share, k) for k in ("tokens", "labels", "loss_mask", "position_ids", "sample_id")}


def test_merged_thd_micro_batches_keep_every_sample(tmp_path):
    """The co-located reference's merge of THD micro-batches: one [1, T1 + T2] row, sequences and sample ids
    shifted, the first batch's padding still no sample's."""
    from minorsft_megatron.data.batch import merge_micro_batches, thd_micro_batch
    from minorsft_megatron.logprobs import sequence_sums

    samples = Samples()
    batches = [thd_micro_batch(samples, [2, 0, 4], 4, 32), thd_micro_batch(samples, [1, 7], 4, 32)]
    merged = merge_micro_batches(batches)
    values = [torch.randn(b.tokens.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
              for k, b in enumerate(batches)]
    separate = torch.cat([sequence_sums(v, b.loss_mask, b.position_sample_ids(), b.num_samples)
                          for v, b in zip(values, batches)])
    together = sequence_sums(torch.cat(values, dim=1), merged.loss_mask, merged.position_sample_ids(),
                             merged.num_samples)
    torch.testing.assert_close(together, separate, rtol=0, atol=1e-12)
    assert merged.tokens.shape == (1, 64) and merged.sample_index.tolist() == [2, 0, 4, 1, 7]
    t1 = batches[0].tokens.size(1)
    assert merged.thd.cu_seqlens_padded.tolist() == (batches[0].thd.cu_seqlens_padded.tolist()
                                                    + [t1 + int(x) for x in batches[1].thd.cu_seqlens_padded[1:]])
    assert merged.thd.max_seqlen == max(b.thd.max_seqlen for b in batches)


@pytest.mark.parametrize("overrides,message", [
    (["parallel.cp=2"], "parallel.cp: context parallelism needs the Transformer Engine layer spec (its attention "
                        "exchanges keys and values between CP ranks); the layer spec here is local"),
    (["parallel.cp=2", "parallel.tp=2", "parallel.sp=true", "data.seq_length=100"],
     "data.seq_length: must be a multiple of 2 * parallel.cp * parallel.tp = 8 under sequence and context "
     "parallelism"),
    (["precision.fp8=hybrid", "data.seq_length=100", "data.micro_batch_size=1"],
     "data.seq_length: FP8 GEMMs (delayed) need the tokens of a micro-batch per rank, micro_batch_size * "
     "seq_length / 1 = 100, to be a multiple of 16"),
    (["reference.precision=fp8", "precision.fp8_recipe=mxfp8", "data.seq_length=112", "data.micro_batch_size=1"],
     "data.seq_length: FP8 GEMMs (mxfp8) need the tokens of a micro-batch per rank, micro_batch_size * seq_length "
     "/ 1 = 112, to be a multiple of 32"),
])
def test_layouts_a_gpu_kernel_cannot_take_are_refused_before_any_work(tmp_path, data_prefix, overrides, message):
    from minorsft_megatron.config import ConfigError, Source, check_for_device, load_config
    from tests.train_workers import tiny_config

    config = tiny_config(tmp_path, data_prefix, model={"spec": "auto"})
    with pytest.raises(ConfigError) as err:
        check_for_device(load_config(config, overrides), Source.of(config, overrides), "cpu")
    assert str(err.value) == f"command line: {message}"  # each named key was set by an override


def test_packing_on_a_transformer_engine_without_thd_is_refused():
    from minorsft_megatron.transformer_engine import TransformerEngineError, check_context_parallel_and_packing

    check_context_parallel_and_packing(2, True, "te", te_version="2.8.0")
    check_context_parallel_and_packing(1, True, "local")
    with pytest.raises(TransformerEngineError, match=r"^data.packing: packed samples on the Transformer Engine "
                                                     r"spec run as THD sequences, which need Transformer Engine "
                                                     r">= 1.10.0; installed: 1.9.0$"):
        check_context_parallel_and_packing(1, True, "te", te_version="1.9.0")
