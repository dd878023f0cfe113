"""Mixture-of-experts training: how the routers' auxiliary losses enter the gradient.

The auxiliary term of one optimizer step is megatron-core's own, as it is without per-token loss:

    A = sum over MoE layers of  coeff * mean over micro-batches and data-parallel ranks of  aux(micro-batch)

with aux the switch-transformer load-balancing loss (moe_aux_loss_coeff) or the router z-loss (moe_z_loss_coeff)
of one micro-batch's tokens, every position the router sees (padding included), computed by megatron-core's
router (its tensor/context-parallel partial losses summed). Each rank averages over its own micro-batches. The
step's loss is  L = sum of per-sequence SFT losses / N + A,  N the global denominator (sequences or answer
tokens, as the loss declares), so the SFT term is exact whatever the batching and A is megatron-core's mean.

Why a correction is needed: under `calculate_per_token_loss` (which the exact SFT normalisation needs) megatron-core
multiplies each auxiliary loss by the router's token count, expecting finalize_model_grads to divide by the global
token count; the SFT losses here are divided by N instead (sequences, for sft_seq, minor_sft and sft_dpo), which
would weigh A by about the tokens per sequence. So the routers attach their losses unscaled
(`attach_unscaled`), and the backward scale megatron-core's schedule sets for them
(`MoEAuxLossAutoScaler.set_loss_scale`, once per micro-batch: the loss scale) is multiplied by
N / (num_microbatches * dp) for the step (`auxiliary_loss_scale`): finalize_model_grads' division by N then
leaves 1 / (num_microbatches * dp).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from minorsft_megatron.logprobs import sequence_sums
from minorsft_megatron.loss import SEQUENCES


def routers(model) -> list:
    """megatron-core's TopKRouter modules of `model`."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in model.modules() if isinstance(m, TopKRouter)]


def attach_unscaled(model) -> None:
    """Make `model`'s routers attach their auxiliary losses without the per-token scaling (see module doc)."""
    for router in routers(model):
        router.calculate_per_token_loss = False


def local_denominator(micro_batches, denominator: str) -> torch.Tensor:
    """This rank's share of the global denominator: sequences with an answer token, or answer tokens (float64)."""
    total = torch.zeros((), dtype=torch.float64, device=micro_batches[0].tokens.device)
    for batch in micro_batches:
        if denominator == SEQUENCES:
            ones = torch.ones_like(batch.loss_mask, dtype=torch.float64)
            counts = sequence_sums(ones, batch.loss_mask, batch.position_sample_ids(), batch.num_samples)
            total += (counts > 0).sum()
        else:
            total += batch.loss_mask.sum()
    return total


def step_scale(micro_batches, denominator: str, dp_group) -> torch.Tensor:
    """N / (num_microbatches * dp): the factor on the auxiliary losses' backward scale for this step.
    Collective: one all-reduce (sum) of a scalar over `dp_group` (the data-parallel ranks, no context parallel)."""
    n = local_denominator(micro_batches, denominator)
    dist.all_reduce(n, group=dp_group)
    return (n / (len(micro_batches) * dist.get_world_size(dp_group))).float()


@contextlib.contextmanager
def auxiliary_loss_scale(factor: torch.Tensor | None):
    """While inside, every loss scale megatron-core sets for the auxiliary losses is multiplied by `factor`
    (None: left alone, a dense model)."""
    if factor is None:
        yield
        return
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    original = MoEAuxLossAutoScaler.__dict__["set_loss_scale"]
    MoEAuxLossAutoScaler.set_loss_scale = staticmethod(lambda scale: original.__func__(scale * factor))
    try:
        yield
    finally:
        MoEAuxLossAutoScaler.set_loss_scale = original


def has_auxiliary_losses(model_cfg) -> bool:
    return model_cfg.num_experts is not None and (model_cfg.moe_aux_loss_coeff > 0 or model_cfg.moe_z_loss_coeff > 0)
