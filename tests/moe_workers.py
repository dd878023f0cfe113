"""Worker for the MoE gradient tests: one training step's parameter gradients at a layout, saved as a checkpoint
(gradients in place of the weights) so that the converter writes them under Hugging Face names."""

from __future__ import annotations

import torch


def answer_mask(tokens: torch.Tensor, prompt_lengths) -> torch.Tensor:
    """[b, s] 1 on the answer positions: label positions from each row's prompt length on."""
    b, s = tokens[:, :-1].shape
    return (torch.arange(s)[None, :] >= torch.tensor(prompt_lengths)[:, None]).float()


def row_masks(tokens: torch.Tensor, prompt_lengths, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
    """([b, s] answer mask, [b, s] bool padding) of rows whose first `lengths` positions are the sample's (all of
    them when None) and the rest padding."""
    b, s = tokens[:, :-1].shape
    lengths = torch.tensor(lengths if lengths is not None else [s] * b)
    padding = torch.arange(s)[None, :] >= lengths[:, None]
    return answer_mask(tokens, prompt_lengths) * ~padding, padding


def step_gradients(ckpt, layout, tokens, prompt_lengths, ref_logp_sum, micro_batch_size, loss, coeffs, out,
                   lengths=None):
    """Gradients of one step of `loss` on `tokens` (rows split over the data-parallel ranks, then into
    micro-batches of `micro_batch_size`; each row's positions from `lengths` on are padding), with `coeffs` =
    (aux, z) on the routers; saved to `out`, and the step's routing figures (moe.RoutingStatistics, per layer) to
    `out`.routing.pt."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from minorsft_megatron import checkpoint, moe, parallel
    from minorsft_megatron.config import ParallelConfig, TrainConfig, from_dict
    from minorsft_megatron.data.batch import SFTBatch
    from minorsft_megatron.device import setup_device
    from minorsft_megatron.forward_step import SFTLossFunction, forward_backward
    from minorsft_megatron.model import build_model, moe_layer_pattern, output_log_probs
    from minorsft_megatron.transformer_engine import RolePrecision

    tp, pp, ep, etp = (*layout, None)[:4]
    device = setup_device("cpu")
    pgs = parallel.initialize(device, tp=tp, pp=pp, ep=ep, etp=etp)
    state = checkpoint.read_state(ckpt)
    cfg = from_dict(TrainConfig, state["config"], ckpt)
    cfg.parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp, sp=tp > 1)
    cfg.model.moe_aux_loss_coeff, cfg.model.moe_z_loss_coeff = coeffs
    model, config = build_model(cfg, RolePrecision("fp32"), state["vocab_size"], device, initialize=False)
    checkpoint.load(ckpt, model)
    config.finalize_model_grads_func = finalize_model_grads
    moe.attach_unscaled(model)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    loss_fn = SFTLossFunction(loss, 0.04, output_log_probs(ddp, 16, state["vocab_size"], pgs.tp, tp > 1))
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows = torch.arange(tokens.size(0)).chunk(dp)[rank]
    mask, padding = row_masks(tokens, prompt_lengths, lengths)
    s = tokens.size(1) - 1
    batches = [SFTBatch(tokens=tokens[i, :-1], labels=tokens[i, 1:], loss_mask=mask[i],
                        position_ids=torch.arange(s).repeat(len(i), 1), ref_logp_sum=ref_logp_sum[i].float(),
                        padding=padding[i])
               for i in rows.split(micro_batch_size)]
    scale = moe.step_scale(batches, loss_fn.spec.denominator, pgs.dp) if moe.has_auxiliary_losses(cfg.model) else None
    routing = moe.RoutingStatistics(model, moe_layer_pattern(config), cfg.model.num_experts,
                                    moe.tracked_losses(cfg.model), per_layer=True)
    routing.start_step()
    with moe.auxiliary_loss_scale(scale):
        forward_backward([ddp], batches, loss_fn, s, micro_batch_size)
    figures = routing.reduce(len(batches), dist.group.WORLD, tp, 1, dp, tp > 1)
    if dist.get_rank() == 0:
        torch.save({k: float(v) for k, v in figures.items()}, f"{out}.routing.pt")
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.main_grad)
    checkpoint.save(out, 0, model, None, state)
