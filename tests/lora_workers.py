"""Worker for the LoRA tests: MinorSFT steps of a converted base with given adapters at a layout, through
megatron-core's DDP and Adam (the distributed optimizer when asked), returning the per-sample log-prob sums (last
pipeline stage), every adapter's local gradient and the optimizer's gradient norm at step 1, and whether the base
weights stayed bit-identical over 4 steps."""

from __future__ import annotations

import torch


def lora_step(ckpt, layout, tokens, prompt_lengths, ref_logp_sum, adapters, rank, alpha, micro_batch_size,
              distributed_optimizer=False, steps=4, dropout=0.0):
    """`layout`: (tp, pp), (tp, pp, ep) (expert tensor parallelism 1) or (tp, pp, ep, etp); `adapters`: {Hugging Face module name
    (a routed expert's model.layers.N.mlp.experts.E.<part>): (A [rank, in], B [out, rank])} full tensors. An MoE
    model's auxiliary losses are off. Returns {"logp_sum": [n] or None, "grads": {(module, "a" or "b"): local
    gradient}, "grad_norm": float, "tp": (size, rank), "base_unchanged": bool}; with `dropout` (lora.dropout), also
    "masks": {PEFT module name: [b, s, in] the dropout mask (0 or 1 / (1 - p)) step 1 drew} (dense models, one
    micro-batch) and "eval_draws": the masks drawn by the scoring pass (eval mode) and a pass with adapters off."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from minorsft_megatron import checkpoint, lora, parallel
    from minorsft_megatron.config import LoraConfig, ParallelConfig, TrainConfig, from_dict
    from minorsft_megatron.data.batch import SFTBatch
    from minorsft_megatron.device import setup_device
    from minorsft_megatron.forward_step import LogProbCollector, SFTLossFunction, forward_backward, forward_log_probs
    from minorsft_megatron.model import build_model, output_log_probs
    from minorsft_megatron.transformer_engine import RolePrecision
    from tests.moe_workers import answer_mask

    tp, pp, ep = (*layout, 1)[:3]
    etp = layout[3] if len(layout) > 3 else 1 if ep > 1 or tp > 1 else None
    device = setup_device("cpu")
    pgs = parallel.initialize(device, tp=tp, pp=pp, ep=ep, etp=etp)
    state = checkpoint.read_state(ckpt)
    cfg = from_dict(TrainConfig, state["config"], ckpt)
    cfg.parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp, sp=tp > 1)
    cfg.lora = LoraConfig(rank=rank, alpha=alpha, dropout=dropout)
    cfg.model.moe_aux_loss_coeff = cfg.model.moe_z_loss_coeff = 0.0
    model, config = build_model(cfg, RolePrecision("fp32"), state["vocab_size"], device, initialize=False,
                                adapters=True)
    checkpoint.load(ckpt, model, base_only=True)
    for number, adapter_set in lora.adapter_sets(model):
        for part in adapter_set.parts:
            adapter_set.load_full(part, *adapters[f"{adapter_set.site.hf_module(number - 1)}.{part}"])
    config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-3, weight_decay=0.0, clip_grad=1e9, params_dtype=torch.float32,
        use_distributed_optimizer=distributed_optimizer), [ddp])
    log_probs = output_log_probs(ddp, 16, state["vocab_size"], pgs.tp, tp > 1)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows = torch.arange(tokens.size(0)).chunk(dp)[dp_rank]
    mask, s = answer_mask(tokens, prompt_lengths), tokens.size(1) - 1
    batches = [SFTBatch(tokens=tokens[i, :-1], labels=tokens[i, 1:], loss_mask=mask[i],
                        position_ids=torch.arange(s).repeat(len(i), 1), ref_logp_sum=ref_logp_sum[i].float(),
                        sample_index=i) for i in rows.split(micro_batch_size)]
    masks = MaskRecorder(model)
    with torch.no_grad():
        ddp.eval()
        scored = forward_log_probs([ddp], batches, LogProbCollector(log_probs), s, micro_batch_size)
        ddp.train()
        with lora.adapters_disabled(ddp):
            forward_log_probs([ddp], batches, LogProbCollector(log_probs), s, micro_batch_size)
    eval_draws = len(masks.drawn)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not lora.is_adapter_key(n)}
    norms = []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward([ddp], batches, SFTLossFunction("minor_sft", 0.04, log_probs), s, micro_batch_size)
        if not norms:
            grads = full_gradients(ddp, model, distributed_optimizer)
            step_masks = masks.named()
        updated, grad_norm, _ = optimizer.step()
        assert updated
        norms.append(grad_norm)
    frozen = [n for n, p in model.named_parameters() if n in base and (p.requires_grad or hasattr(p, "main_grad"))]
    assert not frozen, f"base weights must be frozen, with no gradient buffer: {frozen[:3]}"
    base_unchanged = all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    return {"logp_sum": None if scored is None else scored.logp_sum, "rows": rows, "grads": grads,
            "grad_norm": float(norms[0]), "base_unchanged": base_unchanged, "masks": step_masks,
            "eval_draws": eval_draws,
            "tp": (pgs.tp.size(), pgs.tp.rank()), "column": {k for k in grads if k[0].split(".")[-1] in COLUMN}}


def full_gradients(ddp, model, distributed_optimizer: bool) -> dict:
    """{(module, kind): gradient} of this rank's adapters from megatron-core's gradient buffers; the distributed
    optimizer reduce-scatters each bucket over DP, so its shards are gathered first (into copies)."""
    from megatron.core import parallel_state

    grads = {k: p.main_grad.clone() for k, p in adapter_tensors(model).items()}
    if not distributed_optimizer:
        return grads
    views = {}
    buffers = [(b, parallel_state.get_data_parallel_group()) for b in ddp.buffers] + \
        [(b, parallel_state.get_expert_data_parallel_group()) for b in ddp.expert_parallel_buffers]
    for buffer, group in buffers:
        for bucket in buffer.buckets:
            gathered = torch.empty_like(bucket.grad_data)
            torch.distributed.all_gather_into_tensor(
                gathered, bucket.grad_data.chunk(group.size())[group.rank()].contiguous(), group=group)
            for param in bucket.params:
                views[id(param)] = (bucket, gathered)
    for key, param in adapter_tensors(model).items():
        bucket, gathered = views[id(param)]
        offset = param.main_grad.data_ptr() - bucket.grad_data.data_ptr()
        start = offset // param.main_grad.element_size()
        grads[key] = gathered[start:start + param.numel()].view_as(param)
    return grads


def adapter_tensors(model) -> dict:
    """{(Hugging Face module name, "a" or "b"): parameter} of this rank's adapters."""
    from minorsft_megatron import lora

    found = {}
    for number, adapter_set in lora.adapter_sets(model):
        module = adapter_set.site.hf_module(number - 1)
        for part in adapter_set.parts:
            for kind in "ab":
                found[(f"{module}.{part}", kind)] = getattr(adapter_set, f"{part}_{kind}")
    return found


COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "gate_up_proj")


class MaskRecorder:
    """Records every adapter dropout mask drawn (lora.dropout applied to ones), with the (module, part) it was drawn
    for: an AdapterSet draws one per part, in part order, and a forward hook names them once it has run."""

    def __init__(self, model):
        from minorsft_megatron import lora

        self.drawn, self.names, real = [], [], lora.dropout

        def recording(x, p):
            mask = real(torch.ones_like(x), p)
            self.drawn.append(mask.detach().clone())
            return x * mask

        lora.dropout = recording
        for number, adapter_set in lora.adapter_sets(model):
            module = adapter_set.site.hf_module(number - 1)
            adapter_set.register_forward_hook(lambda s, args, out, module=module: self._name(s, module))

    def _name(self, adapter_set, module) -> None:
        if adapter_set.dropout and adapter_set.training:
            self.names += [f"{module}.{part}" for part in adapter_set.parts]

    def named(self) -> dict:
        """{PEFT module name: [b, s, in] mask} of what was drawn since the last call, batch first."""
        drawn, names = self.drawn[-len(self.names):] if self.names else [], self.names
        found = {name: mask.transpose(0, 1) for name, mask in zip(names, drawn)}
        self.names = []
        return found
