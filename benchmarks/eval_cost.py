#!/usr/bin/env python
"""Cost of evaluation during training: one full evaluation of the bundled held-out set
(examples/data/sft_eval.jsonl, 100 samples) over the time of one training step, measured in one run.

    python benchmarks/eval_cost.py [--config examples/tiny_cpu.yaml] [--nproc 2] [--steps 20] [--interval 5]

Preprocesses the held-out set as the quickstart does (chatml, 128 positions), then trains `--steps` steps with
`data.valid` set and `logging.eval_interval` `--interval`, through `python -m minorsft_megatron.launch -m
minorsft_megatron.train`. Each evaluation after step 0 (which also warms up) is divided by the run's median
seconds per training step (the first 3 steps left out); the row gives the median of those ratios and their
range. An evaluation is the policy's and the co-located reference's forward over every held-out sample: with
100 samples against a global batch of 32, about 100 / 32 x (2 forwards) / (a forward-backward and a forward)
= 1.6 step-equivalents of flops at the quickstart's sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from children import config_data_prefix, ensure_dataset, run_child, spread, step_time_and_memory, torchrun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def held_out_prefix(tmp: str) -> str:
    prefix = os.path.join(tmp, "sft_eval")
    run_child([sys.executable, "tools/preprocess_sft_data.py", "--input", "examples/data/sft_eval.jsonl",
               "--tokenizer", "examples/data/tokenizer.model", "--chat-template", "chatml", "--seq-length", "128",
               "--output-prefix", prefix], "preprocessing the held-out set")
    return prefix


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="examples/tiny_cpu.yaml")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--interval", type=int, default=5)
    args = p.parse_args(argv)
    ensure_dataset(config_data_prefix(args.config))
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        torchrun(args.nproc, "minorsft_megatron.train", [
            "--config", args.config, f"train_steps={args.steps}", f"output_dir={run_dir}", "logging.interval=1000",
            "logging.tensorboard=false", "checkpoint.save_final=false", f"data.valid.held_out={held_out_prefix(tmp)}",
            f"logging.eval_interval={args.interval}"])
        step, _ = step_time_and_memory(run_dir)
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        evals = [r for r in rows if "eval" in r and r["iteration"] > 0]
    ratios = [r["seconds"] / step for r in evals]
    print(f"{args.config}, {args.nproc} processes, {args.steps} steps: a training step {step:.3f} s; "
          f"one evaluation of {int(evals[0]['num_samples'])} held-out samples {statistics.median(r['seconds'] for r in evals):.3f} s "
          f"= {spread(ratios, 2)} training steps ({len(evals)} evaluations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
