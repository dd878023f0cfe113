"""Worker bodies for the trainer tests: several commands run one after another inside one distributed job."""

from __future__ import annotations

import os

import torch


def run_commands(commands: list[tuple[str, list[str]]], crash_when_saving: str | None = None) -> None:
    """Run (command, argv) pairs: 'init', 'score' or 'train' with their command-line arguments.

    With `crash_when_saving`, every rank dies (os._exit, as if killed) right after writing the checkpoint files
    of the save directory ending with that name, before it is committed.
    """
    from megatron.core import dist_checkpointing, parallel_state

    from minorsft_megatron import init_checkpoint, score, train
    from minorsft_megatron.config import load_config

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
