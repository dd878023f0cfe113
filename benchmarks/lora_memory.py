#!/usr/bin/env python
"""What LoRA saves for MinorSFT: peak memory and step time of three runs of one model, measured in one run.

    python benchmarks/lora_memory.py [--config examples/tiny_lora_cpu.yaml] [--nproc 1] [--steps 8] [--repeats 2]
                                     [--layers 8] [--hidden 1024] [--ffn 2816] [--rank 16] [key=value ...]

The runs, `--repeats` times in alternation, all from one random starting checkpoint of a model big enough for its
weights to dominate (`--layers` x `--hidden`, about 100M parameters by default), through `python -m
minorsft_megatron.launch -m minorsft_megatron.train`:
- `full minor_sft, co-located reference`: full fine-tuning, a second model as the reference;
- `lora minor_sft, base reference`: LoRA (`--rank`), the reference the policy with its adapters off;
- `lora sft, no reference`: LoRA with raw SFT.
Peak memory is the logging rank's (GPU: max allocated; CPU: resident set); step time the median seconds per step
after 3 warm-up steps; ratios are taken within a repeat, each cell the median (min-max) over repeats.
Goals (issue 25): LoRA base-reference memory over full co-located <= 0.40, over LoRA sft <= 1.05; its step time
over LoRA sft <= 1.35.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from children import WARMUP_STEPS, config_data_prefix, ensure_dataset, spread, step_time_and_memory, torchrun


VARIANTS = {
    "full minor_sft, co-located reference": ["loss.name=minor_sft", "lora.rank=0", "reference.mode=colocated"],
    "lora minor_sft, base reference": ["loss.name=minor_sft", "reference.mode=base"],
    "lora sft, no reference": ["loss.name=sft", "reference.mode=none"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/tiny_lora_cpu.yaml")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="more config overrides for every run")
    args = parser.parse_args()
    if args.repeats < 1 or args.steps <= WARMUP_STEPS:
        parser.error(f"--repeats must be positive and --steps above the {WARMUP_STEPS} warm-up steps")
    ensure_dataset(config_data_prefix(args.config))
    model = [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", f"model.ffn_hidden_size={args.ffn}",
             f"model.num_attention_heads={args.hidden // 64}", f"model.num_query_groups={max(1, args.hidden // 256)}",
             "parallel.tp=1", f"lora.rank={args.rank}", *args.overrides]
    results = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        torchrun(args.nproc, "minorsft_megatron.init_checkpoint",
                 ["--config", args.config, "--out", init, *[o for o in model if not o.startswith("lora.")]])
        base = ["--config", args.config, f"train_steps={args.steps}", f"checkpoint.init={init}", "logging.interval=1000",
                "logging.tensorboard=false", "checkpoint.save_final=false", *model]
        for repeat in range(args.repeats):
            for i, (name, overrides) in enumerate(VARIANTS.items()):
                run_dir = os.path.join(tmp, f"run{repeat}_{i}")
                torchrun(args.nproc, "minorsft_megatron.train", [*base, f"output_dir={run_dir}", *overrides])
                results[name].append(step_time_and_memory(run_dir))
    full, lora_base, lora_sft = (results[n] for n in VARIANTS)
    print(f"config {args.config} with {args.layers} layers x hidden {args.hidden} (ffn {args.ffn}), LoRA rank "
          f"{args.rank}, {args.nproc} processes, {args.steps} steps x {args.repeats} repeats (median step time after "
          f"{WARMUP_STEPS} warm-up steps; peak memory of the logging rank; ratios within a repeat)")
    for name, runs in results.items():
        print(f"  {name:38s} {spread([t for t, _ in runs], 4)} s/step   {spread([m for _, m in runs], 3)} GiB")
    ratio = lambda a, b, k: spread([x[k] / y[k] for x, y in zip(a, b)], 3)  # noqa: E731
    print(f"  memory: lora base-reference / full co-located x{ratio(lora_base, full, 1)} (goal <= 0.40); "
          f"/ lora sft x{ratio(lora_base, lora_sft, 1)} (goal <= 1.05)")
    print(f"  step time: lora base-reference / lora sft x{ratio(lora_base, lora_sft, 0)} (goal <= 1.35)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
