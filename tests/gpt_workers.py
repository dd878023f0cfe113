"""Worker bodies for the end-to-end tests: a tiny GPTModel with fixed full weights, sharded by layout."""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.transformer import TransformerConfig

from minorsft_megatron import parallel
from minorsft_megatron.device import setup_device
from minorsft_megatron.data.batch import SFTBatch, packed_causal_mask
from minorsft_megatron.forward_step import (
    LogProbCollector,
    SFTLossFunction,
    forward_backward,
    forward_log_probs,
    reduce_step_metrics,
)
from minorsft_megatron.logprobs import OutputLogProbs
from minorsft_megatron.model import build_gpt_model, padded_vocab_size

VOCAB = 50  # real vocabulary; padded to 64 at TP = 1 and 2 (divisible_by=32)
PADDED_VOCAB = padded_vocab_size(VOCAB, 2, divisible_by=32)
SEQ = 16
GLOBAL_BATCH = 8
HIDDEN, FFN, HEADS, GROUPS, LAYERS = 32, 48, 4, 2, 4


def global_batch(seed: int = 0, vocab: int = VOCAB) -> dict:
    """GLOBAL_BATCH rows: a prompt, an answer, then padding; row 5 has no answer token (m = 0)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    loss_mask = torch.zeros(GLOBAL_BATCH, SEQ)
    for row in range(GLOBAL_BATCH):
        prompt = int(torch.randint(2, 7, (), generator=gen))
        end = int(torch.randint(prompt + 1, SEQ + 1, (), generator=gen))
        if row != 5:
            loss_mask[row, prompt - 1 : end - 1] = 1.0  # labels[t] = tokens[t + 1] is an answer token
    ref_logp_sum = -3.0 * loss_mask.sum(-1) + torch.randn(GLOBAL_BATCH, generator=gen) * 5.0
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(SEQ).repeat(GLOBAL_BATCH, 1),
        "ref_logp_sum": ref_logp_sum,
    }


def collect_logp_sums(stats: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample logp_sum and num_answer_tokens of a training pass's per-micro-batch statistics, in order."""
    return torch.cat([d["logp_sum"] for d in stats]), torch.cat([d["num_answer_tokens"] for d in stats])


def micro_batches(batch: dict, dp_rank: int, dp_size: int, micro_batch_size: int, device) -> list[SFTBatch]:
    per_rank = GLOBAL_BATCH // dp_size
    rows = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    out = []
    for start in range(rows.start, rows.stop, micro_batch_size):
        sl = slice(start, start + micro_batch_size)
        out.append(SFTBatch(**{k: v[sl] for k, v in batch.items()}).to(device))
    return out


def model_config(tp: int, pp: int, sp: bool) -> TransformerConfig:
    return TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sp,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        calculate_per_token_loss=True,
    )


def _global_name(model, local_name: str) -> str:
    parts = local_name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def _full_value(name: str, shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if name.endswith("layernorm.weight") or name.endswith("final_layernorm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return 0.2 * torch.randn(shape, generator=gen)


def _shard(name, full, param, tp_rank, tp_size, gated):
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if gated and name.endswith("linear_fc1.weight"):  # [gate; up], each split over TP
        return torch.cat([half.chunk(tp_size, dim)[tp_rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(tp_size, dim)[tp_rank]


def _unshard(name, local, param, tp_group, tp_size, gated):
    if not getattr(param, "tensor_model_parallel", False):
        return local
    dim = param.partition_dim
    parts = [torch.empty_like(local) for _ in range(tp_size)]
    torch.distributed.all_gather(parts, local.contiguous(), group=tp_group)
    if gated and name.endswith("linear_fc1.weight"):
        halves = [p.chunk(2, dim) for p in parts]
        return torch.cat([torch.cat([h[i] for h in halves], dim) for i in range(2)], dim)
    return torch.cat(parts, dim)


def full_grads(model, config, tp_group, tp_size) -> dict:
    """Every parameter's main_grad, gathered to its full TP=1 shape, keyed by its global name."""
    grads = {}
    for name, param in model.named_parameters():
        gname = _global_name(model, name)
        local = param.main_grad.detach().cpu().double()
        grads[gname] = _unshard(gname, local, param, tp_group, tp_size, config.gated_linear_unit)
    return grads


def _full_shape(param, tp_size):
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return shape


def build(tp, pp, sp, device, vocab_size=PADDED_VOCAB, seq_length=SEQ, tied=False):
    config = model_config(tp, pp, sp)
    model = build_gpt_model(
        config,
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=tied,
    )
    tp_rank, tp_size = parallel_state.get_tensor_model_parallel_rank(), tp
    with torch.no_grad():
        for name, param in model.named_parameters():
            gname = _global_name(model, name)
            full = _full_value(gname, _full_shape(param, tp_size))
            param.copy_(_shard(gname, full, param, tp_rank, tp_size, config.gated_linear_unit))
    model.to(device)
    config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    return config, model, ddp


def one_step(tp, pp, dp, sp, micro_batch_size, loss_name, device_name, ref_from_policy=False):
    """One forward-backward of `loss_name` at this layout. Returns full gradients and per-sample sums."""
    device = setup_device(device_name)
    pgs = parallel.initialize(device, tp=tp, pp=pp)
    config, model, ddp = build(tp, pp, sp, device)
    batch = global_batch()
    dp_rank = parallel_state.get_data_parallel_rank()
    batches = micro_batches(batch, dp_rank, dp, micro_batch_size, device)
    log_probs = OutputLogProbs(VOCAB, pgs.tp)
    last = parallel_state.is_pipeline_last_stage()
    if ref_from_policy:  # the reference is a second model with the same weights, run forward-only
        _, ref_model, _ = build(tp, pp, sp, device)
        ref_out = forward_log_probs([ref_model], batches, LogProbCollector(log_probs, pgs.cp), SEQ, micro_batch_size)
        ref_sums = _broadcast_from_last_stage(
            ref_out.logp_sum if last else None, len(batches) * micro_batch_size, device, pgs.pp
        )
        for i, mb in enumerate(batches):
            mb.ref_logp_sum = ref_sums[i * micro_batch_size : (i + 1) * micro_batch_size]
    loss_fn = SFTLossFunction(loss_name, 0.04, log_probs, cp_group=pgs.cp)
    ddp.zero_grad_buffer()
    out = forward_backward([ddp], batches, loss_fn, SEQ, micro_batch_size)
    result = {"grads": full_grads(model, config, pgs.tp, tp), "dp_rank": dp_rank}
    if last:
        logp_sum, num_tokens = collect_logp_sums(out)
        result["logp_sum"] = logp_sum.cpu().double()
        result["num_answer_tokens"] = num_tokens.cpu()
        result["metrics"] = {
            k: v.cpu() for k, v in reduce_step_metrics(out, pgs.dp_cp, has_reference=True).items()
        }
        result["ref_logp_sum"] = torch.cat([mb.ref_logp_sum for mb in batches]).cpu()
    return result


def _broadcast_from_last_stage(value, numel, device, pp_group):
    """The last pipeline stage's tensor on every stage of `pp_group`."""
    if torch.distributed.get_world_size(pp_group) == 1:
        return value
    buf = value if value is not None else torch.empty(numel, device=device)
    src = torch.distributed.get_global_rank(pp_group, torch.distributed.get_world_size(pp_group) - 1)
    torch.distributed.broadcast(buf, src=src, group=pp_group)
    return buf


PACKED_LENGTHS = [(5, 3), (7, 4)]  # two packed rows of SEQ tokens, each holding two samples


def packing_batches(device):
    """The same four samples as 4 unpacked rows and as 2 packed rows (positions restarting per sample)."""
    gen = torch.Generator().manual_seed(11)
    samples = []
    for length in [n for row in PACKED_LENGTHS for n in row]:
        tokens = torch.randint(0, VOCAB, (length + 1,), generator=gen)
        mask = torch.zeros(length)
        mask[int(torch.randint(1, length - 1, (), generator=gen)) :] = 1.0
        samples.append((tokens, mask))
    ref = torch.randn(len(samples), generator=gen) * 3 - 20

    def row(parts):
        tokens, labels, pos = (torch.zeros(SEQ, dtype=torch.long) for _ in range(3))
        mask = torch.zeros(SEQ)
        at = 0
        for t, m in parts:
            n = len(m)
            tokens[at : at + n], labels[at : at + n], mask[at : at + n] = t[:-1], t[1:], m
            pos[at : at + n] = torch.arange(n)
            at += n
        pos[at:] = torch.arange(SEQ - at)
        return tokens, labels, mask, pos

    unpacked_rows = [row([s]) for s in samples]
    unpacked = SFTBatch(*(torch.stack(x) for x in zip(*unpacked_rows)), ref_logp_sum=ref)
    packed_rows = [row(samples[2 * i : 2 * i + 2]) for i in range(2)]
    cu = [0]
    for i, (first, _) in enumerate(PACKED_LENGTHS):  # the row's trailing padding belongs to its last sample
        cu += [i * SEQ + first, (i + 1) * SEQ]
    cu_seqlens = torch.tensor(cu)
    packed = SFTBatch(
        *(torch.stack(x) for x in zip(*packed_rows)),
        attention_mask=packed_causal_mask(cu_seqlens, 2, SEQ),
        cu_seqlens=cu_seqlens,
        ref_logp_sum=ref,
    )
    return unpacked.to(device), packed.to(device)


def packed_and_unpacked(tp, device_name, loss_name):
    """One step on the four samples unpacked, then packed: per-sample sums and full gradients of both."""
    device = setup_device(device_name)
    pgs = parallel.initialize(device, tp=tp)
    out = {}
    for name, batch in zip(("unpacked", "packed"), packing_batches(device)):
        config, model, ddp = build(tp, 1, False, device)
        loss_fn = SFTLossFunction(loss_name, 0.04, OutputLogProbs(VOCAB, pgs.tp), cp_group=pgs.cp)
        ddp.zero_grad_buffer()
        stats = forward_backward([ddp], [batch], loss_fn, SEQ, batch.tokens.size(0))
        logp_sum, num_tokens = collect_logp_sums(stats)
        out[name] = {"grads": full_grads(model, config, pgs.tp, tp), "logp_sum": logp_sum.cpu().double(), "num_answer_tokens": num_tokens.cpu()}
    return out


def dataset_padded_and_packed(prefix, seq_length, vocab_size, device_name):
    """One minor_sft step on step 0 of a preprocessed dataset at DP = world size, padded and then packed rows
    (whose micro-batch count and empty padding rows differ): per-sample sums keyed by dataset index, and the
    DP-reduced gradients."""
    from minorsft_megatron.data.dataset import BatchSettings, SFTBatches, SFTDataset

    device = setup_device(device_name)
    pgs = parallel.initialize(device)
    dataset = SFTDataset(prefix)
    out = {}
    for packing, mbs in ((False, 3), (True, 2)):
        settings = BatchSettings(seq_length, micro_batch_size=mbs, global_batch_size=12, packing=packing)
        batches = SFTBatches(dataset, settings, parallel_state.get_data_parallel_rank(),
                             parallel_state.get_data_parallel_world_size()).micro_batches(0)
        for mb in batches:  # a made-up reference, different per sample
            mb.ref_logp_sum = -5.0 - (mb.sample_index % 7).float()
        batches = [mb.to(device) for mb in batches]
        config, model, ddp = build(1, 1, False, device, padded_vocab_size(vocab_size, 1), seq_length)
        loss_fn = SFTLossFunction("minor_sft", 0.04, OutputLogProbs(vocab_size, pgs.tp), cp_group=pgs.cp)
        ddp.zero_grad_buffer()
        stats = forward_backward([ddp], batches, loss_fn, seq_length, mbs)
        logp_sum, num_tokens = collect_logp_sums(stats)
        index = torch.cat([mb.sample_index for mb in batches]).cpu()
        out["packed" if packing else "padded"] = {
            "grads": full_grads(model, config, pgs.tp, 1), "num_micro_batches": len(batches),
            "empty_rows": sum(mb.tokens.size(0) * seq_length - int(mb.cu_seqlens[-1]) for mb in batches
                              if packing) // seq_length,
            "logp_sum": dict(zip(index.tolist(), logp_sum.cpu().double().tolist())),
            "num_answer_tokens": dict(zip(index.tolist(), num_tokens.cpu().tolist())),
        }
    return out
