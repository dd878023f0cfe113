"""A few MinorSFT steps of a tiny random GPTModel through megatron-core, on any layout.

    torchrun --nproc-per-node 2 examples/minor_sft_steps.py --tp 2 [--pp 1] [--device cpu] [--steps 5]

The reference is a frozen copy of the starting policy, scored forward-only through the same pipeline schedule
each step; step 0 therefore shows every MinorSFT weight at exactly 1 and m_theta at 0. The data are one fixed
global batch of random tokens with a random prompt/answer split, so the policy fits it and drifts from the
reference: m_theta rises and the MinorSFT weights fall below 1.
"""

import argparse

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer import TransformerConfig

from minorsft_megatron import parallel
from minorsft_megatron.device import setup_device
from minorsft_megatron.forward_step import (
    SFTBatch,
    SFTLossFunction,
    collect_logp_sums,
    forward_backward,
    reduce_step_metrics,
)
from minorsft_megatron.model import build_gpt_model, padded_vocab_size

VOCAB, SEQ, MBS, MICRO_BATCHES = 100, 32, 2, 2


def random_batches(device) -> list[SFTBatch]:
    gen = torch.Generator().manual_seed(1000)  # the same global batch each step, on every rank
    batches = []
    for _ in range(MICRO_BATCHES):
        tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=gen)
        prompt = torch.randint(4, SEQ // 2, (MBS, 1), generator=gen)
        positions = torch.arange(SEQ).expand(MBS, SEQ)
        batches.append(
            SFTBatch(
                tokens=tokens[:, :-1],
                labels=tokens[:, 1:],
                loss_mask=(positions >= prompt - 1).float(),
                position_ids=positions,
            ).to(device)
        )
    return batches


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loss", default="minor_sft")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    device = setup_device(args.device)
    pgs = parallel.initialize(device, tp=args.tp, pp=args.pp)
    config = TransformerConfig(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp, pipeline_dtype=torch.float32, use_cpu_initialization=True,
        calculate_per_token_loss=True,
    )
    def build():
        return build_gpt_model(
            config, padded_vocab_size(VOCAB, args.tp), SEQ,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        ).to(device)

    model, reference = build(), build()
    reference.load_state_dict(model.state_dict())  # the frozen starting point
    reference.eval().requires_grad_(False)
    config.finalize_model_grads_func = finalize_model_grads
    policy = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=args.lr, clip_grad=0.0), [policy])

    groups = dict(vocab_size=VOCAB, tp_group=pgs.tp, cp_group=pgs.cp)
    score = SFTLossFunction("sft", 0.04, **groups)
    train = SFTLossFunction(args.loss, 0.04, **groups)
    last_stage = parallel_state.is_pipeline_last_stage()
    for step in range(args.steps):
        batches = random_batches(device)
        with torch.no_grad():
            ref_out = forward_backward([reference], batches, score, SEQ, MBS, forward_only=True)
        if last_stage:  # only the last stage's loss reads the reference sums
            ref_sums = collect_logp_sums(ref_out)[0].split(MBS)
            for mb, ref in zip(batches, ref_sums):
                mb.ref_logp_sum = ref
        policy.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward([policy], batches, train, SEQ, MBS)
        _, grad_norm, _ = optimizer.step()
        if last_stage:
            m = reduce_step_metrics(out, pgs.dp_cp, has_reference=True)
            if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
                print(
                    f"step {step} | loss {m['loss']:.4f} | m_theta {m['m_theta']:+.5f} | weight mean "
                    f"{m['weight_mean']:.6f} min {m['weight_min']:.6f} max {m['weight_max']:.6f} | "
                    f"grad norm {grad_norm:.3f}",
                    flush=True,
                )
    parallel.destroy()


if __name__ == "__main__":
    main()
