"""The trainer tests' helpers: a tiny config, the metrics of a run (and a wait for its first rows), and the worker
body that runs several commands one after another inside one distributed job."""

from __future__ import annotations

import json
import os
import time

import torch
import yaml

TIMING_KEYS = {"tokens_per_s", "seconds_per_iteration", "memory_gib"}


def tiny_config(tmp_path, data_prefix, **sections) -> str:
    """A config file for a tiny fp32 model on `data_prefix`; `sections` override (merged per section)."""
    config = {
        "seed": 7, "device": "cpu", "output_dir": str(tmp_path / "run"),
        "model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
                  "num_query_groups": 2, "max_position_embeddings": 128},
        "precision": {"dtype": "fp32"},
        "optimizer": {"lr": 2e-3, "warmup_ratio": 0.0, "clip_grad": 1.0},
        "data": {"prefix": data_prefix, "seq_length": 128, "micro_batch_size": 4, "global_batch_size": 8},
        "reference": {"precision": "fp32"},
        "logging": {"interval": 100, "tensorboard": False},
    }
    for key, value in sections.items():
        config.setdefault(key, {}).update(value) if isinstance(value, dict) else config.update({key: value})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def metrics(run_dir) -> list[dict]:
    """metrics.jsonl of a run, without the timing and memory fields."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def wait_for_steps(run_dir, count: int, running, timeout: float = 180) -> None:
    """Wait until the run writing `run_dir` has logged `count` metrics rows; fails once `running()` is False or
    after `timeout` seconds."""
    path, deadline = os.path.join(run_dir, "metrics.jsonl"), time.monotonic() + timeout
    while not (os.path.exists(path) and len(open(path).read().splitlines()) >= count):
        assert running(), f"{run_dir}: the run ended before logging {count} steps"
        assert time.monotonic() < deadline, f"{run_dir}: {count} steps not logged in {timeout} s"
        time.sleep(0.05)


def overflow_at_steps(steps: set[int]) -> None:
    """Make the backward pass of these training steps (1-based) overflow: the loss handed to backward is scaled
    by 1e30 (the logged loss is the true one), so fp16 gradients become inf."""
    from minorsft_megatron import train

    real = train.forward_backward
    done = [0]

    def forward_backward(model, batches, loss_function, *args, **kwargs):
        done[0] += 1
        if done[0] not in steps:
            return real(model, batches, loss_function, *args, **kwargs)

        def overflowing(batch, logits):
            loss_sum, denominator, stats = loss_function(batch, logits)
            return loss_sum * 1e30, denominator, stats

        overflowing.cp_group = loss_function.cp_group
        return real(model, batches, overflowing, *args, **kwargs)

    train.forward_backward = forward_backward


def run_commands(commands: list[tuple[str, list[str]]], crash_when_saving: str | None = None,
                 overflow_steps: set[int] = frozenset()) -> None:
    """Run (command, argv) pairs: 'init', 'score' or 'train' with their command-line arguments.

    With `crash_when_saving`, every rank dies (os._exit, as if killed) right after writing the checkpoint files
    of the save directory ending with that name, before it is committed. `overflow_steps`: see overflow_at_steps.
    """
    from megatron.core import dist_checkpointing, parallel_state

    from minorsft_megatron import init_checkpoint, score, train
    from minorsft_megatron.config import load_config

    if overflow_steps:
        overflow_at_steps(set(overflow_steps))

    if crash_when_saving:
        real_save = dist_checkpointing.save

        def save_then_die(state, path, *args, **kwargs):
            real_save(state, path, *args, **kwargs)
            if path.endswith(f"{crash_when_saving}.tmp"):
                os._exit(17)

        dist_checkpointing.save = save_then_die
    for command, argv in commands:
        if command == "train":
            args = train.parse_args(argv)
            train.train(load_config(args.config, args.overrides), args.config)
        elif command == "score":
            score.score(score.parse_args(argv))
        elif command == "init":
            config, out = argv
            init_checkpoint.init_checkpoint(config, out, [])
        else:
            raise ValueError(command)
        torch.distributed.barrier()
        parallel_state.destroy_model_parallel()
        torch.distributed.barrier()
