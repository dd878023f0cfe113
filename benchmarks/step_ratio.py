#!/usr/bin/env python
"""Cost of the reference: step time and peak memory of minor_sft (co-located reference, and reference cache)
over sft, on the same config, measured in one run.

    python benchmarks/step_ratio.py [--config examples/tiny_cpu.yaml] [--nproc 2] [--steps 30] [--repeats 2]

Runs, in turn, `sft` with no reference, `minor_sft` with the co-located reference, and `minor_sft` with a
reference cache (written first by the score tool from the same starting checkpoint), `--repeats` times in
alternation, all through `torchrun -m minorsft_megatron.train`. The median seconds per step (the first 3 steps of
each run are warm-up and left out) and the peak memory of the logging rank (GPU: max allocated; CPU: resident
set) are compared with sft's. Prints the ratios; the flop bound for the co-located reference is about 1.33 (a
reference forward is a third of a forward-backward).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import yaml
from children import config_data_prefix, ensure_dataset, run_child

from minorsft_megatron.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARMUP_STEPS = 3


def torchrun(nproc: int, module: str, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "minorsft_megatron.launch", "--nproc-per-node", str(nproc), "--master-port",
           str(29400 + os.getpid() % 500), "-m", module, *args]
    run_child(cmd, module)


def measure(run_dir: str) -> tuple[float, float]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    timed = [r["seconds_per_iteration"] for r in rows[WARMUP_STEPS:]]
    return statistics.median(timed), max(r["memory_gib"] for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/tiny_cpu.yaml")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        init, cache = os.path.join(tmp, "init"), os.path.join(tmp, "ref.jsonl")
        base = ["--config", args.config, f"train_steps={args.steps}", f"checkpoint.init={init}",
                "logging.interval=1000", "logging.tensorboard=false"]
        from minorsft_megatron.config import load_config

        try:
            ensure_dataset(config_data_prefix(args.config))
            cfg = load_config(os.path.join(REPO, args.config))
        except (UserError, OSError, yaml.YAMLError) as err:
            print(f"error: {args.config}: {err}", file=sys.stderr)
            return 2
        torchrun(args.nproc, "minorsft_megatron.init_checkpoint", ["--config", args.config, "--out", init])
        torchrun(args.nproc, "minorsft_megatron.score",
                 ["--load", init, "--tp", str(cfg.parallel.tp), "--pp", str(cfg.parallel.pp),
                  "--data", cfg.data.prefix, "--out", cache])
        variants = {
            "sft": ["loss.name=sft", "reference.mode=none"],
            "minor_sft, co-located reference": ["loss.name=minor_sft", "reference.mode=colocated"],
            "minor_sft, reference cache": ["loss.name=minor_sft", "reference.mode=cache", f"reference.cache={cache}"],
        }
        results = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for i, (name, overrides) in enumerate(variants.items()):
                run_dir = os.path.join(tmp, f"run{repeat}_{i}")
                torchrun(args.nproc, "minorsft_megatron.train", [*base, f"output_dir={run_dir}", *overrides])
                results[name].append(measure(run_dir))
    step = {name: statistics.median(t for t, _ in runs) for name, runs in results.items()}
    memory = {name: max(m for _, m in runs) for name, runs in results.items()}
    print(f"config {args.config}, {args.nproc} processes, {args.steps} steps x {args.repeats} repeats "
          f"(median step time after {WARMUP_STEPS} warm-up steps; peak memory of the logging rank)")
    for name in variants:
        print(f"  {name:34s} {step[name]:.4f} s/step  x{step[name] / step['sft']:.3f}   "
              f"{memory[name]:.3f} GiB  x{memory[name] / memory['sft']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
