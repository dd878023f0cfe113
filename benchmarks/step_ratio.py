#!/usr/bin/env python
"""Cost of the reference: step time and peak memory of minor_sft (co-located reference, and reference cache)
over sft, on the same config, measured in one run, in each of `--precisions`.

    python benchmarks/step_ratio.py [--config examples/tiny_cpu.yaml] [--nproc 2] [--steps 30] [--repeats 3]
                                    [--precisions bf16 fp32]

(`--config examples/tiny_moe_cpu.yaml`: the same for a mixture-of-experts model at EP = 2.)

For each precision (the policy's and the reference's dtype; the cache is scored in it too), runs in turn `sft`
with no reference, `minor_sft` with the co-located reference, and `minor_sft` with a reference cache (written
first by the score tool from the same starting checkpoint), `--repeats` times in alternation, all through
`python -m minorsft_megatron.launch -m minorsft_megatron.train`. A run's step time is its median seconds per step
(the first 3 steps are warm-up and left out); its ratio to sft is taken against the sft run of the same repeat,
and each row gives the median of those ratios with their range (min-max). Peak memory is the logging rank's
(GPU: max allocated; CPU: resident set). The flop bound for the co-located reference is about 1.33 (a reference
forward is a third of a forward-backward).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import yaml
from children import WARMUP_STEPS, config_data_prefix, ensure_dataset, spread, step_time_and_memory, torchrun

from minorsft_megatron.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


VARIANTS = {
    "sft": ["loss.name=sft", "reference.mode=none"],
    "minor_sft, co-located reference": ["loss.name=minor_sft", "reference.mode=colocated"],
    "minor_sft, reference cache": ["loss.name=minor_sft", "reference.mode=cache"],
}


def measure_precision(args, cfg, tmp: str, precision: str) -> dict:
    """{variant: [(s/step, peak GiB) of each repeat]} in `precision`, from one starting checkpoint."""
    init, cache = os.path.join(tmp, "init"), os.path.join(tmp, f"ref_{precision}.jsonl")
    dtype = [f"precision.dtype={precision}", f"reference.precision={precision}"]
    base = ["--config", args.config, f"train_steps={args.steps}", f"checkpoint.init={init}",
            "logging.interval=1000", "logging.tensorboard=false", *dtype]
    torchrun(args.nproc, "minorsft_megatron.score",
             ["--load", init, "--tp", str(cfg.parallel.tp), "--pp", str(cfg.parallel.pp), "--data", cfg.data.prefix,
              "--out", cache, "--precision", precision])
    results = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        for i, (name, overrides) in enumerate(VARIANTS.items()):
            run_dir = os.path.join(tmp, f"{precision}_run{repeat}_{i}")
            extra = [f"reference.cache={cache}"] if "reference.mode=cache" in overrides else []
            torchrun(args.nproc, "minorsft_megatron.train", [*base, f"output_dir={run_dir}", *overrides, *extra])
            results[name].append(step_time_and_memory(run_dir))
    return results


def report(precision: str, results: dict) -> None:
    sft = results["sft"]
    print(f"{precision}:")
    for name, runs in results.items():
        steps = [t for t, _ in runs]
        time_ratios = [t / base for (t, _), (base, _) in zip(runs, sft)]
        memory_ratios = [m / base for (_, m), (_, base) in zip(runs, sft)]
        print(f"  {name:34s} {spread(steps, 4)} s/step  x{spread(time_ratios, 3)}   "
              f"{max(m for _, m in runs):.3f} GiB  x{spread(memory_ratios, 3)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/tiny_cpu.yaml")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", choices=("bf16", "fp32"), default=["bf16", "fp32"])
    args = parser.parse_args()
    if args.repeats < 1 or args.steps <= WARMUP_STEPS:
        parser.error(f"--repeats must be positive and --steps above the {WARMUP_STEPS} warm-up steps")
    from minorsft_megatron.config import load_config

    try:
        ensure_dataset(config_data_prefix(args.config))
        cfg = load_config(os.path.join(REPO, args.config))
    except (UserError, OSError, yaml.YAMLError) as err:
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        torchrun(args.nproc, "minorsft_megatron.init_checkpoint",
                 ["--config", args.config, "--out", os.path.join(tmp, "init")])
        results = {precision: measure_precision(args, cfg, tmp, precision) for precision in args.precisions}
    print(f"config {args.config}, {args.nproc} processes, {args.steps} steps x {args.repeats} repeats (median step "
          f"time after {WARMUP_STEPS} warm-up steps; ratios to the same repeat's sft, median (min-max); peak memory "
          "of the logging rank)")
    for precision, runs in results.items():
        report(precision, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
