"""Worker for the LoRA tests: one MinorSFT step of a converted base with given adapters at a layout, returning the
per-sample log-prob sums (last pipeline stage) and every adapter's local gradient."""

from __future__ import annotations

import torch


def lora_step(ckpt, layout, tokens, prompt_lengths, ref_logp_sum, adapters, rank, alpha, micro_batch_size):
    """`adapters`: {Hugging Face module name: (A [rank, in], B [out, rank])} full tensors (PEFT's). Returns
    {"logp_sum": [n] or None, "grads": {(module, "a" or "b"): local gradient}, "tp": (size, rank)}."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from minorsft_megatron import checkpoint, lora, parallel
    from minorsft_megatron.config import LoraConfig, ParallelConfig, TrainConfig, from_dict
    from minorsft_megatron.data.batch import SFTBatch
    from minorsft_megatron.device import setup_device
    from minorsft_megatron.forward_step import LogProbCollector, SFTLossFunction, forward_backward, forward_log_probs
    from minorsft_megatron.model import build_model, output_log_probs
    from minorsft_megatron.transformer_engine import RolePrecision
    from tests.moe_workers import answer_mask

    tp, pp = layout
    device = setup_device("cpu")
    pgs = parallel.initialize(device, tp=tp, pp=pp)
    state = checkpoint.read_state(ckpt)
    cfg = from_dict(TrainConfig, state["config"], ckpt)
    cfg.parallel, cfg.lora = ParallelConfig(tp=tp, pp=pp, sp=tp > 1), LoraConfig(rank=rank, alpha=alpha)
    model, config = build_model(cfg, RolePrecision("fp32"), state["vocab_size"], device, initialize=False,
                                adapters=True)
    checkpoint.load(ckpt, model, base_only=True)
    for number, adapter_set in lora.adapter_sets(model):
        for part in adapter_set.parts:
            adapter_set.load_full(part, *adapters[f"model.layers.{number - 1}.{lora.HF_MODULES[adapter_set.target]}.{part}"])
    config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    log_probs = output_log_probs(ddp, 16, state["vocab_size"], pgs.tp, tp > 1)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows = torch.arange(tokens.size(0)).chunk(dp)[dp_rank]
    mask, s = answer_mask(tokens, prompt_lengths), tokens.size(1) - 1
    batches = [SFTBatch(tokens=tokens[i, :-1], labels=tokens[i, 1:], loss_mask=mask[i],
                        position_ids=torch.arange(s).repeat(len(i), 1), ref_logp_sum=ref_logp_sum[i].float(),
                        sample_index=i) for i in rows.split(micro_batch_size)]
    with torch.no_grad():
        scored = forward_log_probs([ddp], batches, LogProbCollector(log_probs), s, micro_batch_size)
    forward_backward([ddp], batches, SFTLossFunction("minor_sft", 0.04, log_probs), s, micro_batch_size)
    grads = {}
    for number, adapter_set in lora.adapter_sets(model):
        module = f"model.layers.{number - 1}.{lora.HF_MODULES[adapter_set.target]}"
        for part in adapter_set.parts:
            for kind in "ab":
                grads[(f"{module}.{part}", kind)] = getattr(adapter_set, f"{part}_{kind}").main_grad.clone()
    base_grads = [p for n, p in model.named_parameters() if not lora.is_adapter_key(n) and p.requires_grad]
    assert not base_grads, "base weights must be frozen"
    return {"logp_sum": None if scored is None else scored.logp_sum, "rows": rows, "grads": grads,
            "tp": (pgs.tp.size(), pgs.tp.rank()), "column": {k for k in grads if k[0].split(".")[-1] in COLUMN}}


COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
