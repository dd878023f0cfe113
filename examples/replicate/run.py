#!/usr/bin/env python
"""The replication study in one command: does MinorSFT deviate less, and score higher at its best learning rate?

    python examples/replicate/run.py [--out runs/replicate] [--workers 2] [--seeds 3]

1. Writes the synthetic corpus (tasks.py): task A (four skills) and task B (a new skill), disjoint held-out
   words, and a character-level tokenizer; preprocesses the training and held-out sets with
   tools/preprocess_sft_data.py.
2. Pre-trains the base model on task A (`minorsft_megatron.train`, loss sft, from `init_checkpoint`).
3. Scores the base model (`minorsft_megatron.score`): on task B's training set (the reference cache every
   fine-tuning run reads) and on task A's held-out set (the baseline of the retention measures); greedy
   answers of the base model (`minorsft_megatron.generate`) give its accuracies.
4. Fine-tunes the base on task B: sft_seq, dft, asft and iw_sft over the learning-rate grid, sft_dpo and
   minor_sft over the learning-rate x beta grid, every seed. Each run is evaluated: greedy exact match on task B dev and test and
   on task A test, and the log-probs of task A test against the base (retention). The best setting of a
   method is chosen on task B *dev* (mean over seeds); the tables report task B *test*.
5. Writes results.json (every run), report.md (tables, verdicts) and the figures into --out.

Runs go to a pool of --workers processes (one CPU thread each). Each worker calls the package's commands'
entry points (`train.main`, `generate.main`, `score.main`, the functions behind `python -m ...`) one after
another in-process, which saves the ~5 s of interpreter and megatron-core import a new process per command
would cost. A run whose result.json exists is not run again: an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import tasks  # noqa: E402  (examples/replicate/tasks.py)

METHODS = ("sft_seq", "sft_dpo", "minor_sft", "dft", "asft", "iw_sft")
BETA_METHODS = ("sft_dpo", "minor_sft")
# The reference-aware SFT family beside MinorSFT (no beta; the paper's claims stay about MinorSFT).
FAMILY = ("dft", "asft", "iw_sft")
# ASFT reads the reference's logits, which a cache of sums cannot serve: the reference runs beside the policy.
COLOCATED = ("asft",)
SIZES = {"a_train": 20000, "a_test": 400, "b_train": 3200, "b_dev": 200, "b_test": 400}
SMOKE_SIZES = {"a_train": 640, "a_test": 8, "b_train": 64, "b_dev": 8, "b_test": 8}
MAX_NEW_TOKENS = tasks.MAX_LEN + 2


# ---- settings ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/replicate", help="study directory (default runs/replicate)")
    p.add_argument("--workers", type=int, default=2, help="parallel runs, one CPU thread each (default 2)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3, 4e-3],
                   help="fine-tuning peak learning rates (default 5e-4 1e-3 2e-3 4e-3)")
    p.add_argument("--betas", type=float, nargs="+", default=[0.01, 0.04, 0.06, 0.08, 0.11, 0.16, 0.64],
                   help="betas of sft_dpo and minor_sft (default 0.01 0.04 0.06 0.08 0.11 0.16 0.64; the paper's "
                        "is 0.04)")
    p.add_argument("--corpus-seed", type=int, default=0)
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each fine-tuning run's checkpoint")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny corpus and 10 pre-training steps: checks the whole pipeline in about a minute "
                        "(its numbers mean nothing)")
    args = p.parse_args(argv)
    if args.workers < 1 or args.seeds < 1:
        p.error("--workers and --seeds must be at least 1")
    if min(args.lrs + args.betas) <= 0:
        p.error("--lrs and --betas must be > 0")
    return args


# ---- 1. data -------------------------------------------------------------------------------------------------

def run_command(argv: list[str], log_path: str, threads: int) -> None:
    """A package command in its own process; its output goes to `log_path`; failure ends the study."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=REPO)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"error: `{' '.join(argv[:4])} ...` failed (exit {proc.returncode}); see {log_path}")


def make_data(out: str, corpus_seed: int, sizes: dict[str, int], log: str) -> dict[str, str]:
    """JSONL splits, the tokenizer, and the indexed datasets of every split; returns {split: prefix}."""
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    splits = tasks.corpus(corpus_seed, **sizes)
    tasks.write_splits(splits, data)
    tasks.train_tokenizer([r["prompt"] + " " + r["response"] for rows in splits.values() for r in rows],
                          os.path.join(data, "tokenizer.model"))
    for name in splits:
        run_command([sys.executable, "tools/preprocess_sft_data.py", "--input", jsonl(out, name),
                     "--tokenizer", tokenizer(out), "--chat-template", "none", "--seq-length", "32",
                     "--output-prefix", os.path.join(data, name)], log, threads=1)
    return {name: os.path.join(data, name) for name in splits}


def jsonl(out: str, split: str) -> str:
    return os.path.join(out, "data", f"{split}.jsonl")


def tokenizer(out: str) -> str:
    return os.path.join(out, "data", "tokenizer.model")


# ---- 2. the base model ---------------------------------------------------------------------------------------

def pretrain_base(out: str, log: str, threads: int, overrides: list[str]) -> str:
    base = os.path.join(out, "base")
    ckpt = os.path.join(base, "checkpoints")
    if os.path.exists(os.path.join(ckpt, "latest_checkpointed_iteration.txt")):
        return ckpt
    config = os.path.join(HERE, "base.yaml")
    data = os.path.join(out, "data", "a_train")
    init = os.path.join(out, "init")
    shutil.rmtree(base, ignore_errors=True)  # no complete base model: this stage starts again from scratch
    run_command([sys.executable, "-m", "minorsft_megatron.init_checkpoint", "--config", config, "--out", init,
                 "--overwrite", f"data.prefix={data}"], log, threads)
    run_command([sys.executable, "-m", "minorsft_megatron.train", "--config", config, f"data.prefix={data}",
                 f"output_dir={base}", f"checkpoint.init={init}", *overrides], log, threads)
    return ckpt


# ---- 3./4. runs in the worker pool ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER_LOG = ""


def worker_init(log_dir: str) -> None:
    """One thread, its own rendezvous port, and its output in its own log file (the parent prints progress)."""
    import torch

    global WORKER_LOG
    torch.set_num_threads(1)
    os.environ["MASTER_PORT"] = str(free_port())
    WORKER_LOG = os.path.join(log_dir, f"worker-{os.getpid()}.log")
    log = open(WORKER_LOG, "a")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)


def call(command: str, argv: list[str]) -> None:
    """Run a package command's entry point in this process, as `python -m minorsft_megatron.<command>`."""
    import importlib

    print(f"$ python -m minorsft_megatron.{command} {' '.join(argv)}", flush=True)
    rc = importlib.import_module(f"minorsft_megatron.{command}").main(argv)
    sys.stdout.flush()
    if rc != 0:
        raise RuntimeError(f"minorsft_megatron.{command} exited {rc}; see {WORKER_LOG}")


def evaluate(out: str, ckpt: str, run_dir: str, reference: str | None) -> dict:
    """Greedy exact match on B dev/test and A test; log-probs of A test (against the base when given)."""
    for split in ("b_dev", "b_test", "a_test"):
        call("generate", ["--load", ckpt, "--jsonl", jsonl(out, split), "--tokenizer", tokenizer(out),
                          "--chat-template", "none", "--out", os.path.join(run_dir, f"answers_{split}.jsonl"),
                          "--max-new-tokens", str(MAX_NEW_TOKENS)])
    score_a = os.path.join(run_dir, "logp_a_test.jsonl")
    argv = ["--load", ckpt, "--data", os.path.join(out, "data", "a_test"), "--out", score_a,
            "--micro-batch-size", "100", "--precision", "fp32"]
    call("score", argv + (["--reference", reference] if reference else []))
    return {**{f"acc_{s}": exact_match(os.path.join(run_dir, f"answers_{s}.jsonl"))
               for s in ("b_dev", "b_test", "a_test")}, **logp_summary(score_a, reference)}


def exact_match(path: str) -> float:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return sum(r["exact_match"] for r in rows) / len(rows)


def logp_summary(path: str, reference: str | None) -> dict:
    """Task A retention: NLL per answer token, and (against the base) m_theta = mean over samples of D/m."""
    from minorsft_megatron.reference_cache import read_cache

    _, logp_sum, counts = read_cache(path)
    result = {"nll_a_test": float(-logp_sum.sum() / counts.sum())}
    if reference:
        _, ref_sum, _ = read_cache(reference)
        result["m_theta_a_test"] = float(((logp_sum - ref_sum) / counts).mean())
    return result


def base_job(out: str, ckpt: str) -> dict:
    """The base model's reference cache on B train, its A-test log-probs, and its accuracies."""
    run_dir = os.path.join(out, "base_eval")
    os.makedirs(run_dir, exist_ok=True)
    call("score", ["--load", ckpt, "--data", os.path.join(out, "data", "b_train"),
                   "--out", os.path.join(run_dir, "logp_b_train.jsonl"), "--micro-batch-size", "100",
                   "--precision", "fp32"])  # the policy's dtype: step-1 m_theta is then 0
    result = evaluate(out, ckpt, run_dir, reference=None)
    result["m_theta_a_test"] = 0.0
    return result


def run_name(method: str, lr: float, beta: float | None, seed: int) -> str:
    return f"{method}_lr{lr:g}" + ("" if beta is None else f"_beta{beta:g}") + f"_seed{seed}"


def grid(args) -> list[tuple[str, float, float | None]]:
    """(method, lr, beta) of every setting; the methods without a beta have None."""
    return [(m, lr, None) for m in METHODS if m not in BETA_METHODS for lr in args.lrs] + [
        (m, lr, beta) for m in BETA_METHODS for lr in args.lrs for beta in args.betas]


def reference_overrides(method: str, cache: str) -> list[str]:
    """The base model's fp32 log-prob sums (the cache), or for a loss reading its logits the base itself, run in
    fp32 beside the policy (the policy's dtype: step-1 m_theta is then 0)."""
    if method in COLOCATED:
        return ["reference.mode=colocated", "reference.precision=fp32"]
    return [f"reference.cache={cache}"]


def finetune_job(job: dict) -> dict:
    """Train one setting, evaluate it, summarise it into result.json; the checkpoint is removed unless kept."""
    out, run_dir = job["out"], job["dir"]
    done = os.path.join(run_dir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    start = time.perf_counter()
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts again from scratch
    os.makedirs(run_dir)
    base_eval = os.path.join(out, "base_eval")
    call("train", ["--config", os.path.join(HERE, "finetune.yaml"),
                   f"data.prefix={os.path.join(out, 'data', 'b_train')}", f"output_dir={run_dir}",
                   f"checkpoint.init={job['base']}",
                   *reference_overrides(job["method"], os.path.join(base_eval, "logp_b_train.jsonl")),
                   f"loss.name={job['method']}", f"loss.beta={job['beta'] or 0.04}", f"optimizer.lr={job['lr']}",
                   f"seed={job['seed']}", f"data.seed={job['seed']}"])
    ckpt = os.path.join(run_dir, "checkpoints")
    result = {k: job[k] for k in ("method", "lr", "beta", "seed")}
    result.update(evaluate(out, ckpt, run_dir, os.path.join(base_eval, "logp_a_test.jsonl")))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    result["m_theta_steps"] = [s["m_theta"] for s in steps]
    result["loss_steps"] = [s["loss"] for s in steps]
    result["seconds"] = time.perf_counter() - start
    if not job["keep_checkpoint"]:
        shutil.rmtree(ckpt)
    tmp = f"{done}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, done)
    return result


# ---- 5. summary ----------------------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return m, math.sqrt(var)


def settings(results: list[dict]) -> dict[tuple, list[dict]]:
    """Runs grouped by (method, lr, beta): one entry per seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["lr"], r["beta"]), []).append(r)
    return groups


def best_setting(groups: dict[tuple, list[dict]], method: str) -> tuple:
    """The method's setting with the highest mean task-B *dev* accuracy (ties: the lower learning rate)."""
    mine = [k for k in groups if k[0] == method]
    return max(mine, key=lambda k: (mean_std([r["acc_b_dev"] for r in groups[k]])[0], -k[1]))


def result_or_exit(pool, future, what: str):
    """The job's result; a failed job ends the study in one line (finished runs are kept for a rerun)."""
    try:
        return future.result()
    except Exception as err:
        pool.shutdown(cancel_futures=True)
        sys.exit(f"error: {what} failed: {err}")


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out = os.path.abspath(args.out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    stage_log = os.path.join(logs, "commands.log")

    def progress(message: str) -> None:
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {message}", flush=True)

    make_data(out, args.corpus_seed, SMOKE_SIZES if args.smoke else SIZES, stage_log)
    progress(f"data written and preprocessed in {out}/data")
    base = pretrain_base(out, stage_log, args.workers, ["train_steps=10"] if args.smoke else [])
    progress(f"base model pre-trained on task A: {base}")

    os.environ["OMP_NUM_THREADS"] = "1"
    # Not multiprocessing.Pool: its daemonic workers cannot start the writer processes of dist checkpointing.
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"), initializer=worker_init,
                             initargs=(logs,)) as pool:
        base_result = result_or_exit(pool, pool.submit(base_job, out, base), "scoring the base model")
        progress("base model: task B dev {acc_b_dev:.3f}, task A test {acc_a_test:.3f}, "
                 "task A NLL {nll_a_test:.4f}".format(**base_result))

        jobs = [{"out": out, "base": base, "method": m, "lr": lr, "beta": beta, "seed": seed,
                 "keep_checkpoint": args.keep_checkpoints,
                 "dir": os.path.join(out, "runs", run_name(m, lr, beta, seed))}
                for m, lr, beta in grid(args) for seed in range(1, args.seeds + 1)]
        results = []
        for future in as_completed([pool.submit(finetune_job, job) for job in jobs]):
            r = result_or_exit(pool, future, "a fine-tuning run")
            results.append(r)
            progress(f"{len(results):3d}/{len(jobs)} {run_name(r['method'], r['lr'], r['beta'], r['seed'])}: "
                     f"B test {r['acc_b_test']:.3f}, A test {r['acc_a_test']:.3f}, "
                     f"final m_theta {r['m_theta_steps'][-1]:+.3f}")

    import report

    minutes = (time.perf_counter() - started) / 60
    report.write(out, base_result, results, args, minutes)
    progress(f"wrote {out}/results.json, {out}/report.md and the figures")
    print(f"total run time: {minutes:.1f} min on {args.workers} worker(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
