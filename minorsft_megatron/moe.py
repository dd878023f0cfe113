"""Mixture-of-experts training: how the routers' auxiliary losses enter the gradient.

The auxiliary term of one optimizer step is megatron-core's own, as it is without per-token loss:

    A = sum over MoE layers of  coeff * mean over micro-batches and data-parallel ranks of  aux(micro-batch)

with aux the switch-transformer load-balancing loss (moe_aux_loss_coeff) or the router z-loss (moe_z_loss_coeff)
of one micro-batch's sample positions (padding left out: forward_step passes megatron-core's `padding_mask`),
computed by megatron-core's router (its tensor/context-parallel partial losses summed; the z-loss as the mean over
the micro-batch's positions, compat.py). Each rank averages over its own micro-batches. The
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

The log (never the gradient) gets each step's routing figures from `RoutingStatistics`: the auxiliary losses
without their coefficients, as they enter A, and how unevenly the experts are loaded.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from minorsft_megatron import compat
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


class RoutingStatistics:
    """One step's routing figures of a model's MoE layers, for the log (detached; the gradient never sees them):

    - `moe_load_balancing_loss`, `moe_z_loss` (those the config turns on): each MoE layer's loss without its
      coefficient as it enters A (megatron-core's record of it, averaged over micro-batches and data-parallel ranks),
      then the mean over the MoE layers, as Megatron-LM logs them;
    - `moe_max_load`: per MoE layer, the most loaded expert's routed tokens over the mean per expert, over the whole
      global batch (1: balanced; num_experts / topk: every token on the same experts); the worst layer.

    `per_layer` adds each MoE layer's three figures as `<name>_layer_<i>` (i the global layer index from 0, as in
    Hugging Face names).
    """

    def __init__(self, model, moe_layers: list[bool], num_experts: int, losses: tuple[str, ...], per_layer: bool):
        """`moe_layers`: per global layer, whether it is an MoE layer; `losses`: the tracked loss names logged."""
        self.moe_layers, self.losses, self.per_layer = moe_layers, losses, per_layer
        device = next(model.parameters()).device
        self.tokens_per_expert = torch.zeros(len(moe_layers), num_experts, dtype=torch.float64, device=device)
        for router in routers(model):
            router.register_forward_hook(self._count)

    def _count(self, router, inputs, output) -> None:
        """Forward hook: add one micro-batch's routed tokens per expert (output: probs, [tokens, experts] routing
        map), padding left out (inputs: hidden states, then megatron-core's padding mask, True at padding). Only
        with gradients on: a recomputed layer routes once without (the forward) and once with (backward)."""
        if not torch.is_grad_enabled():
            return
        routed = output[1]
        if len(inputs) > 1 and inputs[1] is not None:
            routed = routed & ~inputs[1].reshape(-1, 1)
        self.tokens_per_expert[router.layer_number - 1] += routed.sum(0)

    def start_step(self) -> None:
        self.tokens_per_expert.zero_()
        compat.clear_moe_tracked_losses()

    def reduce(self, num_microbatches: int, world_group, tp: int, cp: int, dp: int, sp: bool) -> dict:
        """The step's figures (see the class), on every rank. Each rank's share is scaled so that one sum over the
        world is the answer: the load-balancing losses are partial over TP and CP (summed) and averaged over DP; the
        z-losses are each rank's mean (averaged over TP, CP and DP); token counts are summed over CP and DP, and
        over TP under sequence parallelism (without it every TP rank routes the same tokens).
        Collective: one all-reduce (sum) over `world_group`."""
        num_layers = len(self.moe_layers)
        tracked = compat.moe_tracked_losses()
        zeros = self.tokens_per_expert.new_zeros(num_layers)
        shares = {"load_balancing_loss": dp, "z_loss": tp * cp * dp}
        packed = torch.cat([tracked.get(name, zeros).double() / shares[name] for name in self.losses]
                           + [(self.tokens_per_expert / (1 if sp else tp)).flatten()])
        dist.all_reduce(packed, group=world_group)
        per_layer = {f"moe_{name}": packed[i * num_layers:(i + 1) * num_layers] / num_microbatches
                     for i, name in enumerate(self.losses)}
        counts = packed[len(self.losses) * num_layers:].view(num_layers, -1)
        per_layer["moe_max_load"] = counts.amax(-1) / counts.mean(-1)
        layers = [i for i, is_moe in enumerate(self.moe_layers) if is_moe]
        metrics = {name: values[layers].mean() for name, values in per_layer.items() if name != "moe_max_load"}
        metrics["moe_max_load"] = per_layer["moe_max_load"][layers].amax()
        if self.per_layer:
            metrics.update({f"{name}_layer_{i}": values[i] for name, values in per_layer.items() for i in layers})
        return metrics


def tracked_losses(model_cfg) -> tuple[str, ...]:
    """The names megatron-core's routers record the auxiliary losses this model has under."""
    balancing = model_cfg.moe_load_balancing == "aux_loss" and model_cfg.moe_aux_loss_coeff > 0
    return (("load_balancing_loss",) if balancing else ()) + (("z_loss",) if model_cfg.moe_z_loss_coeff > 0 else ())
