#!/usr/bin/env python
"""Peak memory and time of one forward-backward of the loss path, output layer included, from the final hidden
states `[s, 1, h]` (bf16) and an output weight `[V, h]` (bf16) to the summed answer log-probs:

- today (before the fused op): the output layer's logits `[s, 1, V]`, GPTModel's transposed copy `[1, s, V]`,
  Float16Module's fp32 upcast, then `vocab_parallel_log_probs` (fp32 math, fp32 softmax kept for backward);
- unfused: the same without Float16Module's fp32 copy (`fp32_output=False`: what `loss.logprob_chunk_size: 0`
  runs now);
- fused: `fused_log_probs`, `--chunk-size` positions of logits at a time (the default path);
- asft_full: ASFT's loss (DFT's term plus 0.1 KL(pi_ref || pi_theta) per position) from both models' full
  logits materialised (a frozen reference's hidden states and weight beside the policy's);
- asft_fused: the same loss from `fused_log_probs_and_kl`, both models' logits chunk by chunk.

    python benchmarks/logprob_memory.py [--vocab 152064 128256] [--seq 4096 8192] [--hidden 1024]
                                        [--chunk-size 256] [--device cpu|cuda]

Each measurement runs in a fresh process: on CPU the peak resident-set growth over the inputs (ru_maxrss, glibc's
mmap threshold fixed so that freed tensors are given back), on a GPU the allocator's peak over the inputs. As in
training, the weight's fp32 `main_grad` exists beforehand (megatron-core's DistributedDataParallel): today's and
the unfused path add their bf16 weight gradient into it as DDP's hook does, the fused op adds into it directly.
The time is the forward-backward's wall time. Every measurement is repeated `--repeat` times (default 3), the
paths alternating within each repeat so that a slower stretch of the machine falls on all of them; each row gives
the median and the range (min-max), and a path's ratios to today's are taken repeat by repeat (each against the
today run beside it), then their median and range. The last line is `V=152064 s=4096: peak_memory_ratio=R
time_ratio=T (min A, max B, N repeats)` (fused over today's), and with both ASFT paths `V=152064 s=4096: asft
peak_memory_ratio=R ...` (asft_fused over asft_full, repeat by repeat).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from children import child_error, spread

PATHS = ("today", "unfused", "fused", "asft_full", "asft_fused")
KL_COEF = 0.1


def asft_path(path: str, hidden, weight, ref_hidden, ref_weight, labels, vocab: int, chunk: int):
    """ASFT's loss summed over every position: -sg(p_t) log p_t + KL_COEF * KL(pi_ref || pi_theta)."""
    import torch

    from minorsft_megatron.logprobs import fused_log_probs_and_kl

    if path == "asft_fused":
        logp, kl = fused_log_probs_and_kl(hidden.transpose(0, 1), weight, ref_hidden.transpose(0, 1), ref_weight,
                                          labels, vocab, chunk_size=chunk)
    else:
        log_p = torch.nn.functional.linear(hidden, weight).transpose(0, 1).float().log_softmax(-1)  # [1, s, V]
        with torch.no_grad():
            log_r = torch.nn.functional.linear(ref_hidden, ref_weight).transpose(0, 1).float().log_softmax(-1)
        logp = log_p.gather(-1, labels[..., None])[..., 0]
        kl = (log_r.exp() * (log_r - log_p)).sum(-1)
    return (-(logp.detach().exp() * logp) + KL_COEF * kl).sum()


def loss_path(path: str, hidden, weight, labels, vocab: int, chunk: int, ref=None):
    import torch

    from minorsft_megatron.logprobs import fused_log_probs, vocab_parallel_log_probs

    if path.startswith("asft"):
        return asft_path(path, hidden, weight, *ref, labels, vocab, chunk)
    if path == "fused":
        return fused_log_probs(hidden.transpose(0, 1), weight, labels, vocab, chunk_size=chunk).sum()
    logits = torch.nn.functional.linear(hidden, weight)  # [s, 1, V] the output layer, bf16
    logits = logits.transpose(0, 1).contiguous()  # [1, s, V] GPTModel's output
    if path == "today":
        logits = logits.float()  # Float16Module's fp32 output
    return vocab_parallel_log_probs(logits, labels, vocab).sum()


def _ddp_hook(param) -> None:
    """What megatron-core's DDP does once a parameter's gradient is ready: add it into main_grad, unless the
    layer already did (grad_added_to_main_grad), and drop it."""
    if not param.grad_added_to_main_grad:
        param.main_grad.add_(param.grad)
    param.grad = None


def measure(path: str, vocab: int, seq: int, hidden_size: int, chunk: int, device_name: str) -> dict:
    """One forward-backward in this process: peak memory over the inputs (GiB) and seconds."""
    import psutil
    import torch

    from minorsft_megatron.convert import allocate_large_tensors_with_mmap

    allocate_large_tensors_with_mmap()
    torch.manual_seed(0)
    device = torch.device(device_name)
    hidden = torch.empty(seq, 1, hidden_size, dtype=torch.bfloat16, device=device).normal_().requires_grad_()
    weight = torch.empty(vocab, hidden_size, dtype=torch.bfloat16, device=device).normal_(0, 0.02)
    weight.requires_grad_()
    weight.main_grad = torch.zeros(vocab, hidden_size, dtype=torch.float32, device=device)  # DDP's buffer
    weight.grad_added_to_main_grad = False
    weight.register_post_accumulate_grad_hook(_ddp_hook)
    labels = torch.randint(0, vocab, (1, seq), device=device)
    ref = None
    if path.startswith("asft"):  # a frozen reference: its final hidden states and output weight, bf16
        ref = (torch.empty_like(hidden).normal_().requires_grad_(False), torch.empty_like(weight).normal_(0, 0.02))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = psutil.Process().memory_info().rss
    start = time.perf_counter()
    loss_path(path, hidden, weight, labels, vocab, chunk, ref).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss is in KiB
    return {"peak_gib": peak / 2**30, "seconds": time.perf_counter() - start}


def run_child(path, vocab, seq, hidden_size, chunk, device) -> dict:
    args = [sys.executable, __file__, "--child", path, "--vocab", str(vocab), "--seq", str(seq), "--hidden",
            str(hidden_size), "--chunk-size", str(chunk), "--device", device]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:  # a size that does not fit is a row of the table, not the end of the benchmark
        return {"error": child_error(done.stderr, done.returncode)}
    return json.loads(done.stdout.strip().splitlines()[-1])


def repeated(paths, vocab, seq, args) -> dict:
    """{path: [result of each repeat]}: every path measured once per repeat, in turn."""
    runs = {path: [] for path in paths}
    for _ in range(args.repeat):
        for path in paths:
            runs[path].append(run_child(path, vocab, seq, args.hidden, args.chunk_size, args.device))
    return runs


def table_rows(vocab: int, seq: int, runs: dict) -> dict:
    """Print one row per path; return {path: (peak ratios, time ratios)} to today's, repeat by repeat."""
    ratios = {}
    for path, results in runs.items():
        failed = [r["error"] for r in results if "error" in r]
        if failed:
            print(f"| {vocab} | {seq} | {path} | failed: {failed[0]} | | | |")
            continue
        peaks, seconds = [r["peak_gib"] for r in results], [r["seconds"] for r in results]
        pairs = [(r, t) for r, t in zip(results, runs.get("today", [])) if "error" not in t]
        rel = "- | -"
        if pairs:
            ratios[path] = ([r["peak_gib"] / t["peak_gib"] for r, t in pairs],
                            [r["seconds"] / t["seconds"] for r, t in pairs])
            rel = f"{spread(ratios[path][0], 3)} | {spread(ratios[path][1], 3)}"
        print(f"| {vocab} | {seq} | {path} | {spread(peaks, 2)} | {spread(seconds, 2)} | {rel} |", flush=True)
    return ratios


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[152064, 128256])
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--chunk-size", type=int, default=256, help="as loss.logprob_chunk_size (default 256)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--repeat", type=int, default=3, help="measurements of each path, alternating (default 3)")
    p.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.repeat < 1:
        p.error(f"--repeat: {args.repeat} is not a positive count")
    if args.child:
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        print(json.dumps(measure(args.child, args.vocab[0], args.seq[0], args.hidden, args.chunk_size, args.device)))
        return 0
    print(f"hidden {args.hidden}, chunk {args.chunk_size} positions, {args.device}; peak memory over the inputs; "
          f"median (min-max) of {args.repeat} alternating repeats")
    print("| V | s | path | peak (GiB) | seconds | peak / today | time / today |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    fused, asft = {}, {}
    for vocab in args.vocab:
        for seq in args.seq:
            runs = repeated(args.paths, vocab, seq, args)
            ratios = table_rows(vocab, seq, runs)
            if "fused" in ratios:
                fused[vocab, seq] = ratios["fused"]
            pairs = [(f, m) for f, m in zip(runs.get("asft_fused", []), runs.get("asft_full", []))
                     if "error" not in f and "error" not in m]
            if pairs:
                asft[vocab, seq] = [f["peak_gib"] / m["peak_gib"] for f, m in pairs], \
                    [f["seconds"] / m["seconds"] for f, m in pairs]
    if (152064, 4096) in fused:
        peaks, times = fused[152064, 4096]
        print(f"V=152064 s=4096: peak_memory_ratio={statistics.median(peaks):.3f} "
              f"time_ratio={statistics.median(times):.3f} (min {min(times):.3f}, max {max(times):.3f}, "
              f"{len(times)} repeats)")
    if (152064, 4096) in asft:
        peaks, times = asft[152064, 4096]
        print(f"V=152064 s=4096: asft peak_memory_ratio={statistics.median(peaks):.3f} (min {min(peaks):.3f}, max "
              f"{max(peaks):.3f}) time_ratio={statistics.median(times):.3f} (asft_fused over asft_full, "
              f"{len(peaks)} repeats)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
