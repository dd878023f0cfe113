"""Fine-tune with MinorSFT (or a baseline) under any TP/PP/SP/CP/DP layout, on GPUs or CPU processes.

    torchrun --nproc-per-node N -m minorsft_megatron.train --config FILE.yaml [key=value ...]

One step: the frozen reference scores the whole global batch forward-only through the same pipeline
schedule (or its log-probs come from the cache), then the policy runs forward-backward with the loss,
then megatron-core's optimizer steps. See config.py for every setting.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import yaml

from minorsft_megatron import checkpoint, parallel
from minorsft_megatron.config import (
    ConfigError,
    TrainConfig,
    check_for_device,
    load_config,
    to_dict,
    validate,
)
from minorsft_megatron.data.dataset import BatchSettings, DataError, SFTBatches, SFTDataset
from minorsft_megatron.device import peak_memory_gib, setup_device
from minorsft_megatron.forward_step import SFTLossFunction, forward_backward, reduce_step_metrics
from minorsft_megatron.metrics_log import MetricsLog
from minorsft_megatron.model import checkpoint_vocab_size, gpt_from_config, transformer_config
from minorsft_megatron.reference import CachedReference, ColocatedReference, ReferenceCacheError

USER_ERRORS = (ConfigError, DataError, checkpoint.CheckpointError, ReferenceCacheError, parallel.LayoutError)


@dataclass
class Policy:
    model: torch.nn.Module
    """This stage's model (Float16Module-wrapped in bf16/fp16): what checkpoints save and load."""
    ddp: torch.nn.Module
    """`model` in megatron-core's DistributedDataParallel: what the schedule runs."""
    optimizer: object
    scheduler: object


def build_model(cfg: TrainConfig, dtype: str, vocab: int, device, initialize: bool, fp8: str | None = None,
                fp8_param: bool = False):
    """This pipeline stage's GPTModel (wrapped in Float16Module for bf16/fp16) on `device`, on the layer spec
    `cfg.model.spec` resolves to here (auto: Transformer Engine on a GPU where it imports)."""
    from dataclasses import replace

    from megatron.core import parallel_state
    from megatron.core.transformer.module import Float16Module

    from minorsft_megatron import transformer_engine

    cfg = replace(cfg, model=replace(cfg.model, spec=transformer_engine.resolve_spec(cfg.model.spec, device.type)))
    config = transformer_config(cfg.model, cfg.parallel, dtype, initialize=initialize, fp8=fp8,
                                fp8_recipe=cfg.precision.fp8_recipe, fp8_param=fp8_param)
    torch.manual_seed(cfg.seed)  # the full weights are drawn on the CPU from this seed, then split over TP
    model = gpt_from_config(cfg.model, config, checkpoint_vocab_size(vocab),
                            parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage())
    if dtype != "fp32":
        model = Float16Module(config, model)
    return model.to(device), config


def build_policy(cfg: TrainConfig, vocab: int, device, total_steps: int) -> Policy:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    model, config = build_model(cfg, cfg.precision.dtype, vocab, device, initialize=cfg.checkpoint.init is None,
                                fp8=cfg.precision.fp8)
    config.finalize_model_grads_func = finalize_model_grads
    o = cfg.optimizer
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=o.distributed),
        model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                        clip_grad=o.clip_grad, bf16=cfg.precision.dtype == "bf16",
                        fp16=cfg.precision.dtype == "fp16", params_dtype=config.params_dtype,
                        use_distributed_optimizer=o.distributed),
        [ddp],
    )
    warmup = int(round(o.warmup_ratio * total_steps))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1), lr_decay_style=o.decay, start_wd=o.weight_decay,
        end_wd=o.weight_decay, wd_incr_steps=total_steps, wd_incr_style="constant",
    )
    return Policy(model, ddp, optimizer, scheduler)


def unwrap(model):
    return getattr(model, "module", model)


def build_reference(cfg: TrainConfig, policy: Policy, vocab: int, device, pgs, dataset, start_id):
    """The reference the config asks for (None for mode none), holding the policy's *starting* weights."""
    mode = cfg.reference.mode
    if mode == "none":
        return None
    if mode == "cache":
        return CachedReference(cfg.reference.cache, dataset.fingerprint, start_id)
    r = cfg.reference
    fp8 = (cfg.precision.fp8 or "e4m3") if r.precision == "fp8" or r.fp8_weights else None
    dtype = "bf16" if r.precision == "fp8" else r.precision
    model, _ = build_model(cfg, dtype, vocab, device, initialize=False, fp8=fp8, fp8_param=r.fp8_weights)
    unwrap(model).load_state_dict(unwrap(policy.model).state_dict())  # cast to the reference's dtype
    loss_fn = SFTLossFunction("sft", cfg.loss.beta, vocab_size=vocab, tp_group=pgs.tp, cp_group=pgs.cp)
    merge = (cfg.reference.micro_batch_size or cfg.data.micro_batch_size) // cfg.data.micro_batch_size
    return ColocatedReference(model, loss_fn, device, cfg.data.seq_length, cfg.data.micro_batch_size,
                              offload=cfg.reference.offload, merge=merge)


def layout(cfg: TrainConfig) -> dict:
    return {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "cp": cfg.parallel.cp, "world": dist.get_world_size()}


def resume_path(cfg: TrainConfig, save_dir: str) -> str | None:
    if cfg.checkpoint.load is not None:
        return cfg.checkpoint.load
    return save_dir if checkpoint.has_checkpoint(save_dir) else None


def check_resumed_state(state: dict, path: str, dataset, start_id) -> None:
    if state["dataset_fingerprint"] != dataset.fingerprint:
        raise checkpoint.CheckpointError(
            f"{path}: was trained on dataset {state['dataset_fingerprint'][:12]}, this run's data.prefix "
            f"is dataset {dataset.fingerprint[:12]}"
        )
    if state["start_checkpoint_id"] != start_id:
        raise checkpoint.CheckpointError(
            f"{path}: started from checkpoint {state['start_checkpoint_id']}, this run starts from {start_id}"
        )


def step_record(iteration, consumed, lr, metrics, grad_norm, tokens, seconds, device) -> dict:
    record = {"iteration": iteration, "consumed_samples": consumed, "lr": lr}
    record.update({k: float(v) for k, v in metrics.items()})
    record.update(grad_norm=float(grad_norm or 0.0), tokens_per_s=tokens / seconds,
                  seconds_per_iteration=seconds, memory_gib=peak_memory_gib(device))
    return record


def train(cfg: TrainConfig, source: str) -> dict:
    """Run the job this process belongs to; returns the last step's metrics on the logging rank."""
    from megatron.core import parallel_state

    device = setup_device(cfg.device)
    validate(cfg, source, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    check_for_device(cfg, source, device.type)
    dataset = SFTDataset(cfg.data.prefix)
    vocab = cfg.model.vocab_size or dataset.meta["tokenizer"]["vocab_size"]
    if dataset.meta["tokenizer"]["vocab_size"] > vocab:
        raise ConfigError(f"{source}: model.vocab_size: {vocab} is smaller than the tokenizer's "
                          f"{dataset.meta['tokenizer']['vocab_size']} tokens (data.prefix {cfg.data.prefix})")
    pgs = parallel.initialize(device, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, seed=cfg.seed)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    d = cfg.data
    settings = BatchSettings(d.seq_length, d.micro_batch_size, d.global_batch_size, d.packing, d.seed, d.epochs)
    total_steps = SFTBatches(dataset, settings, dp_rank, dp_size).num_steps
    total_steps = min(total_steps, cfg.train_steps or total_steps)

    policy = build_policy(cfg, vocab, device, total_steps)
    start_id, hf_origin = None, None
    if cfg.checkpoint.init is not None:
        start = checkpoint.load(cfg.checkpoint.init, policy.model)
        start_id, hf_origin = start["checkpoint_id"], start.get("hf")  # Hugging Face config and tokenizer files
    reference = build_reference(cfg, policy, vocab, device, pgs, dataset, start_id)

    save_dir = cfg.checkpoint.save or os.path.join(cfg.output_dir, "checkpoints")
    iteration, consumed = 0, 0
    resumed_from = resume_path(cfg, save_dir)
    if resumed_from is not None:
        state = checkpoint.load(resumed_from, policy.model, policy.optimizer, layout=layout(cfg))
        check_resumed_state(state, resumed_from, dataset, start_id)
        policy.scheduler.load_state_dict(state["scheduler"])
        iteration, consumed = state["iteration"], state["consumed_samples"]

    loss_fn = SFTLossFunction(cfg.loss.name, cfg.loss.beta, vocab_size=vocab, tp_group=pgs.tp, cp_group=pgs.cp)
    batches = SFTBatches(dataset, settings, dp_rank, dp_size, consumed_samples=consumed)
    logging_rank = parallel.is_logging_rank()
    log = None
    if logging_rank:
        log = MetricsLog(cfg.output_dir, total_steps, cfg.logging.interval, cfg.logging.tensorboard,
                         cfg.logging.progress_bar, resume=resumed_from is not None)
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        if resumed_from is not None:
            log.print(f"resumed from {checkpoint.resolve(resumed_from)} at iteration {iteration}")

    def state_to_save():
        return {"config": to_dict(cfg), "vocab_size": vocab, "scheduler": policy.scheduler.state_dict(),
                "consumed_samples": consumed, "dataset_fingerprint": dataset.fingerprint,
                "start_checkpoint_id": start_id, "layout": layout(cfg), "hf": hf_origin}

    record = {}
    last_stage = parallel_state.is_pipeline_last_stage()
    stop_at = min(total_steps, cfg.stop_at_step or total_steps)
    for micro_batches in batches:
        if iteration >= stop_at:
            break
        step_start = time.perf_counter()
        tokens = int((dataset.lengths[batches.global_batch(iteration)] - 1).sum())
        micro_batches = [mb.to(device) for mb in micro_batches]
        if reference is not None:
            reference.attach(micro_batches)
        policy.ddp.zero_grad_buffer()
        policy.optimizer.zero_grad()
        stats = forward_backward([policy.ddp], micro_batches, loss_fn, d.seq_length, d.micro_batch_size)
        lr = policy.optimizer.param_groups[0]["lr"]  # the rate this step applies
        _, grad_norm, _ = policy.optimizer.step()
        policy.scheduler.step(increment=1)
        iteration, consumed = iteration + 1, consumed + d.global_batch_size
        metrics = reduce_step_metrics(stats, pgs.dp_cp, has_reference=reference is not None) if last_stage else {}
        if logging_rank:
            record = step_record(iteration, consumed, lr, metrics, grad_norm, tokens,
                                 time.perf_counter() - step_start, device)
            log.step(record)
        at_interval = cfg.checkpoint.interval and iteration % cfg.checkpoint.interval == 0
        if at_interval or iteration == stop_at:
            path = checkpoint.save(save_dir, iteration, policy.model, policy.optimizer, state_to_save(),
                                   cfg.checkpoint.keep)
            if logging_rank:
                log.print(f"saved checkpoint {path}")
    if logging_rank:
        log.print(f"done: metrics in {log.path} (TensorBoard: {os.path.join(cfg.output_dir, 'tensorboard')}), "
                  f"checkpoints in {save_dir}")
        log.close()
    return record


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minorsft_megatron.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (see minorsft_megatron/config.py)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optimizer.lr=1e-5 parallel.tp=2")
    return parser.parse_args(argv)


def run_main(job, argv=None, extra_errors: tuple = ()) -> int:
    """Run `job()` as a command: user errors are one line on stderr (rank 0) and exit status 2."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    try:
        job()
    except USER_ERRORS + extra_errors as err:
        if os.environ["RANK"] == "0":
            print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            parallel.destroy()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(lambda: train(load_config(args.config, args.overrides), args.config))


if __name__ == "__main__":
    sys.exit(main())
