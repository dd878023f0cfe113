#!/usr/bin/env python
"""GPU step benchmark: tokens/s per GPU, model FLOPs utilisation and peak memory of sft, minor_sft with a
co-located reference and minor_sft with the reference cache, in bf16 and FP8, on Llama-style models with random
weights; and FP8-versus-BF16 log-prob agreement on the same samples. Everything in one run.

    python benchmarks/gpu_step.py [--size 1b|3b] [--nproc 1] [--seq-length 4096] [--steps 20] [--peak-tflops 989]
    python benchmarks/gpu_step.py --smoke      # the same pipeline on CPU with a tiny fp32 model (no FP8)

Steps: synthetic SFT records long enough to fill `--seq-length` are preprocessed with the bundled tokenizer;
a random starting checkpoint is written (init_checkpoint); the score tool writes the bf16 reference cache and an
FP8 one (current scaling: forward-only FP8 never uses delayed scaling); then the trainer runs each variant for
`--steps` steps (TE spec, bf16 weights, FP8 `hybrid` with the `delayed` recipe for the FP8 rows), saving no
checkpoint (`checkpoint.save_final=false`). Reported from each run's metrics.jsonl: the median step time after 3 warm-up
steps, tokens/s per GPU, MFU = tokens/s per GPU x (6 N + 6 L h S) / peak FLOP/s, and the peak memory. The
agreement figure is exp(mean over every answer token of |log p_fp8 - log p_bf16|), from the score tool's
`--per-token` output.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile

from children import run_child

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {  # Llama-style shapes, vocabulary 32,000 (the bundled 1,024-piece tokenizer fits in it)
    "1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16, num_query_groups=8),
    "3b": dict(num_layers=28, hidden_size=3072, ffn_hidden_size=8192, num_attention_heads=24, num_query_groups=8),
    "smoke": dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2),
}
WARMUP = 3


def parameters(shape: dict, vocab: int = 32000) -> int:
    h, f, layers = shape["hidden_size"], shape["ffn_hidden_size"], shape["num_layers"]
    d = h // shape["num_attention_heads"]
    attention = h * (shape["num_attention_heads"] + 2 * shape["num_query_groups"]) * d + h * h
    return layers * (attention + 3 * h * f + 2 * h) + 2 * vocab * h + h


def synthetic_records(path: str, n: int, words: int) -> None:
    rng = random.Random(0)
    vocab = "alpha beta gamma delta river stone cloud green light music paper table water winter".split()
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(vocab) for _ in range(words // 4))
            response = " ".join(rng.choice(vocab) for _ in range(words))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")


def run(args: list[str], nproc: int) -> None:
    cmd = [sys.executable, "-m", "minorsft_megatron.launch", "--nproc-per-node", str(nproc), "--master-port",
           str(29300 + os.getpid() % 500), *args]
    run_child(cmd, " ".join(args[:2]))


def summarise(run_dir: str) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))][WARMUP:]
    step = statistics.median(r["seconds_per_iteration"] for r in rows)
    return {"s_per_step": step, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
            "memory_gib": max(r["memory_gib"] for r in rows)}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("1b", "3b"), default="1b")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--reference-micro-batch-size", type=int, default=4,
                   help="rows per forward of the co-located reference (a multiple of --micro-batch-size)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200 SXM: 989)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny fp32 model, no FP8: checks the pipeline only")
    args = p.parse_args()
    args.size = "smoke" if args.smoke else args.size
    args.seq_length = 128 if args.smoke else args.seq_length
    args.nproc = 2 if args.smoke else args.nproc
    args.global_batch = 8 * args.nproc * (1 if args.smoke else args.micro_batch_size)
    args.reference_micro_batch_size = 8 if args.smoke else args.reference_micro_batch_size
    args.dtype = "fp32" if args.smoke else "bf16"
    args.precisions = [args.dtype] if args.smoke else ["bf16", "fp8"]
    return args


def prepare(tmp: str, args) -> tuple[str, list[str], dict]:
    """Synthetic data, a random starting checkpoint and the reference caches in `tmp`: (config, the overrides
    every run shares, reference cache per precision)."""
    seq, nproc = args.seq_length, args.nproc
    records, prefix = os.path.join(tmp, "records.jsonl"), os.path.join(tmp, "data")
    synthetic_records(records, 4 * args.global_batch * (args.steps + 2), words=seq // 2)
    run_child([sys.executable, "tools/preprocess_sft_data.py", "--input", records, "--tokenizer",
               "examples/data/tokenizer.model", "--chat-template", "none", "--seq-length", str(seq),
               "--output-prefix", prefix, "--workers", "4"], "preprocessing the synthetic records")
    model = [f"model.{k}={v}" for k, v in SIZES[args.size].items()] + [
        "model.vocab_size=32000", f"model.max_position_embeddings={seq}"]
    base = [f"data.prefix={prefix}", f"data.seq_length={seq}", f"data.global_batch_size={args.global_batch}",
            f"data.micro_batch_size={4 if args.smoke else 1}", f"train_steps={args.steps + WARMUP}",
            "logging.tensorboard=false", "logging.interval=1000", "optimizer.distributed=false",
            "device=" + ("cpu" if args.smoke else "cuda"), f"parallel.tp={2 if args.smoke else 1}",
            "model.spec=" + ("local" if args.smoke else "te")]
    config = os.path.join(tmp, "bench.yaml")  # everything else comes as overrides, the model from init
    with open(config, "w") as f:
        f.write("seed: 1234\n")
    init = os.path.join(tmp, "init")
    run(["-m", "minorsft_megatron.init_checkpoint", "--config", config, "--out", init, *base, *model,
         f"precision.dtype={args.dtype}"], nproc)
    caches = {}
    for precision in args.precisions:
        caches[precision] = os.path.join(tmp, f"ref_{precision}.jsonl")
        run(["-m", "minorsft_megatron.score", "--load", init, "--tp", str(2 if args.smoke else 1), "--data",
             prefix, "--out", caches[precision], "--precision", precision, "--micro-batch-size", "1",
             "--per-token", f"{caches[precision]}.tokens"], nproc)
    # no checkpoint is saved by any measured run: at 3B one would be ~42 GB with the optimizer state
    return config, base + [f"checkpoint.init={init}", "checkpoint.save_final=false"], caches


def variants(args, precision: str, caches: dict) -> dict[str, list[str]]:
    """The measured runs of one precision: sft, minor_sft with the co-located reference, and with the cache."""
    ref_precision = "fp8" if precision == "fp8" else args.dtype
    return {
        "sft": ["loss.name=sft", "reference.mode=none"],
        "minor_sft, co-located": ["loss.name=minor_sft", "reference.mode=colocated",
                                  f"reference.precision={ref_precision}",
                                  f"reference.micro_batch_size={args.reference_micro_batch_size}"],
        "minor_sft, cache": ["loss.name=minor_sft", "reference.mode=cache",
                             f"reference.cache={caches[args.precisions[0]]}"],
    }


def main() -> int:
    args = parse_args()
    results, agreement = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        config, base, caches = prepare(tmp, args)
        for precision in args.precisions:
            fp8 = ["precision.fp8=hybrid", "precision.fp8_recipe=delayed"] if precision == "fp8" else []
            dtype = "bf16" if precision == "fp8" else args.dtype
            for name, extra in variants(args, precision, caches).items():
                out = os.path.join(tmp, f"{precision}_{name.split(',')[0]}_{len(results)}")
                run(["-m", "minorsft_megatron.train", "--config", config, *base, f"output_dir={out}",
                     f"precision.dtype={dtype}", *fp8, *extra], args.nproc)
                results[(precision, name)] = summarise(out)
        if not args.smoke:
            agreement = fp8_agreement(caches["bf16"], caches["fp8"])
    report(results, agreement, args.size, args.seq_length, args.nproc, args.peak_tflops, SIZES[args.size])
    return 0


def fp8_agreement(bf16_cache: str, fp8_cache: str) -> float:
    """exp(mean over every answer token of |log p_fp8 - log p_bf16|), from the score tool's --per-token files."""
    import math

    a = [json.loads(line)["token_logp"] for line in open(f"{bf16_cache}.tokens")]
    b = [json.loads(line)["token_logp"] for line in open(f"{fp8_cache}.tokens")]
    diffs = [abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)]
    return math.exp(sum(diffs) / len(diffs))


def report(results, agreement, size, seq, nproc, peak_tflops, shape) -> None:
    n = parameters(shape)
    flops_per_token = 6 * n + 6 * shape["num_layers"] * shape["hidden_size"] * seq
    print(f"model {size}: {n / 1e9:.2f} B parameters, seq length {seq}, {nproc} process(es)")
    print("| precision | run | s/step | x sft | tokens/s per GPU | MFU | peak memory (GiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (precision, name), r in results.items():
        sft = results[(precision, "sft")]
        per_gpu = r["tokens_per_s"] / nproc
        mfu = per_gpu * flops_per_token / (peak_tflops * 1e12)
        print(f"| {precision} | {name} | {r['s_per_step']:.3f} | {r['s_per_step'] / sft['s_per_step']:.3f} | "
              f"{per_gpu:.0f} | {100 * mfu:.1f}% | {r['memory_gib']:.2f} |")
    if agreement is not None:
        print(f"FP8 versus BF16 scoring: exp(mean |delta log p| over answer tokens) = {agreement:.4f}")


if __name__ == "__main__":
    sys.exit(main())
