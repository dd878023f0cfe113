"""Fine-tune with MinorSFT (or a baseline) under any TP/PP/SP/CP/DP layout, on GPUs or CPU processes.

    torchrun --nproc-per-node N -m minorsft_megatron.train --config FILE.yaml [key=value ...]

One step: the frozen reference scores the whole global batch forward-only through the same pipeline
schedule (or its log-probs come from the cache), then the policy runs forward-backward with the loss,
then megatron-core's optimizer steps. See config.py for every setting.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import yaml

from minorsft_megatron import checkpoint, evaluate, lora, moe, parallel, paths, stop_signal, transformer_engine
from minorsft_megatron.cli import ArgumentParser, run_main
from minorsft_megatron.errors import UserError
from minorsft_megatron.config import (
    KEEP_BEST_METRICS,
    ConfigError,
    Source,
    TrainConfig,
    check_for_device,
    load_config,
    to_dict,
    validate,
)
from minorsft_megatron.data.dataset import BatchSettings, SFTBatches, SFTDataset
from minorsft_megatron.device import peak_memory_gib, setup_device
from minorsft_megatron.forward_step import LogProbCollector, SFTLossFunction, forward_backward, reduce_step_metrics
from minorsft_megatron.loss import LOSSES, REF_LOGITS, REF_TOKENS
from minorsft_megatron.metrics_log import MetricsLog
from minorsft_megatron.model import build_model, moe_layer_pattern, output_log_probs, unwrap
from minorsft_megatron.reference import BaseReference, CachedReference, ColocatedReference


SCHEDULE_KEYS = ("optimizer.lr", "optimizer.min_lr", "optimizer.warmup_ratio", "optimizer.decay",
                 "optimizer.weight_decay", "train_steps")
"""Settings the learning-rate schedule is made of: a resume with others is refused unless
checkpoint.override_schedule asks to recompute the schedule from them."""
RUN_KEYS = ("loss.name", "loss.beta", "data.global_batch_size", "data.seed", "data.epochs", "precision.dtype")
"""Settings that make a run what it is: a resume with others is refused (start a new run from the weights)."""


class NonFiniteError(UserError):
    """The loss or the gradient norm stopped being finite; the run stops before saving."""


@dataclass
class Policy:
    model: torch.nn.Module
    """This stage's model (Float16Module-wrapped in bf16/fp16): what checkpoints save and load."""
    ddp: torch.nn.Module
    """`model` in megatron-core's DistributedDataParallel: what the schedule runs."""
    optimizer: object
    scheduler: object


@dataclass
class Run:
    """What one training job holds between its steps."""

    cfg: TrainConfig
    device: torch.device
    pgs: object
    """megatron-core's ProcessGroupCollection."""
    dataset: SFTDataset
    vocab: int
    batches: SFTBatches
    """This DP rank's micro-batches of each step, from the consumed samples on."""
    total_steps: int
    """Length of the run and of its learning-rate schedule."""
    stop_at: int
    """The iteration this invocation stops (and saves) at."""
    policy: Policy
    reference: object
    """CachedReference, ColocatedReference or None."""
    loss_fn: SFTLossFunction
    save_dir: str
    start_id: str | None
    """Identity of the starting checkpoint (checkpoint.init); None: random initialisation."""
    hf_origin: dict | None
    """Hugging Face config and tokenizer files the starting checkpoint came with, carried into every save."""
    iteration: int = 0
    consumed: int = 0
    log: MetricsLog | None = None
    """On the logging rank only."""
    lock: object = None
    """Rank 0's lock on the run directory (paths.DirectoryLock), held until the process ends."""
    routing: moe.RoutingStatistics | None = None
    """An MoE policy's routing figures for the log; None for a dense model."""
    stop_request: stop_signal.StopRequest = field(default_factory=stop_signal.StopRequest)
    """This rank's record of a stop signal (SIGTERM, SIGUSR1)."""
    stop_signal: int = 0
    """The stop signal the ranks agreed on at the last step (0: none): save and stop."""
    held_out: list = None
    """The data.valid sets (evaluate.HeldOutSet); [] without evaluation."""
    greedy: tuple | None = None
    """eval_generate: (tokenizer, stop token ids) for greedy answers."""
    best_value: dict = None
    """keep_best: {iteration: value} of the selecting figure at evaluations not yet saved."""
    best: dict | None = None
    """keep_best: the best saved checkpoint so far (SAVE/best_checkpoint.json), or None."""


# ---- building ---------------------------------------------------------------------------------------------------

def build_policy(cfg: TrainConfig, vocab: int, device, total_steps: int) -> Policy:
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    model, config = build_model(cfg, transformer_engine.role_precision(cfg, "policy"), vocab, device,
                                initialize=cfg.checkpoint.init is None, adapters=cfg.lora.rank > 0)
    config.finalize_model_grads_func = finalize_model_grads
    moe.attach_unscaled(model)  # their backward scale is set per step (moe.py)
    o = cfg.optimizer
    ddp = DistributedDataParallel(config, ddp_config(cfg, device), model)
    if ddp.ddp_config.overlap_grad_reduce:  # as Megatron-LM wires it: no reduce before the last micro-batch
        config.no_sync_func, config.grad_sync_func = ddp.no_sync, ddp.start_grad_sync
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                        clip_grad=o.clip_grad, bf16=cfg.precision.dtype == "bf16",
                        fp16=cfg.precision.dtype == "fp16", params_dtype=config.params_dtype,
                        initial_loss_scale=cfg.precision.initial_loss_scale,
                        loss_scale_window=cfg.precision.loss_scale_window, use_distributed_optimizer=o.distributed),
        [ddp],
    )
    config.grad_scale_func = optimizer.scale_loss  # the schedule scales each loss before backward (fp16)
    warmup = int(round(o.warmup_ratio * total_steps))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1), lr_decay_style=o.decay, start_wd=o.weight_decay,
        end_wd=o.weight_decay, wd_incr_steps=total_steps, wd_incr_style="constant",
    )
    return Policy(model, ddp, optimizer, scheduler)


def ddp_config(cfg: TrainConfig, device):
    """megatron-core's DDP settings: fp32 gradient reduction, the distributed optimizer if asked, and the
    communication overlaps (parallel.overlap_*; by default on a GPU, off on CPU processes)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    on_gpu, p, distributed = device.type == "cuda", cfg.parallel, cfg.optimizer.distributed
    grad = (on_gpu or bool(p.overlap_param_gather)) if p.overlap_grad_reduce is None else p.overlap_grad_reduce
    param = (on_gpu and distributed and grad) if p.overlap_param_gather is None else p.overlap_param_gather
    return DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed,
                                         overlap_grad_reduce=grad, overlap_param_gather=param)


def build_reference(cfg: TrainConfig, policy: Policy, vocab: int, device, pgs, dataset, start_id):
    """The reference the config asks for (None for mode none), holding the policy's *starting* weights."""
    mode = cfg.reference.mode
    if mode == "none":
        return None
    if mode == "cache":
        return CachedReference(cfg.reference.cache, dataset.fingerprint, start_id)
    merge = (cfg.reference.micro_batch_size or cfg.data.micro_batch_size) // cfg.data.micro_batch_size
    reads = LOSSES[cfg.loss.name].reads  # per-token log-probs, or hidden states for the KL, beside the sums
    keep = dict(keep_token_log_probs=REF_TOKENS in reads, keep_hidden=REF_LOGITS in reads)
    if mode == "base":
        log_probs = output_log_probs(policy.model, cfg.loss.logprob_chunk_size, vocab, pgs.tp, cfg.parallel.sp)
        return BaseReference(policy.ddp, LogProbCollector(log_probs, pgs.cp, **keep), cfg.data.seq_length,
                             cfg.data.micro_batch_size, merge=merge)
    model, _ = build_model(cfg, transformer_engine.role_precision(cfg, "reference"), vocab, device, initialize=False)
    base_weights = {k: v for k, v in unwrap(policy.model).state_dict().items() if not lora.is_adapter_key(k)}
    unwrap(model).load_state_dict(base_weights)  # cast to the reference's dtype
    log_probs = output_log_probs(model, cfg.loss.logprob_chunk_size, vocab, pgs.tp, cfg.parallel.sp)
    collector = LogProbCollector(log_probs, pgs.cp, **keep)
    return ColocatedReference(model, collector, device, cfg.data.seq_length, cfg.data.micro_batch_size,
                              offload=cfg.reference.offload, merge=merge)


def policy_loss(cfg: TrainConfig, policy: Policy, vocab: int, pgs, reference) -> SFTLossFunction:
    """The loss function megatron-core's schedule calls; the reference's output head where the loss reads its
    whole distribution (the co-located model's, or with LoRA the policy's own)."""
    log_probs = output_log_probs(policy.model, cfg.loss.logprob_chunk_size, vocab, pgs.tp, cfg.parallel.sp)
    head = reference.collector.log_probs if REF_LOGITS in LOSSES[cfg.loss.name].reads else None
    return SFTLossFunction(cfg.loss.name, cfg.loss.beta, log_probs, pgs.cp, cfg.loss.kl_coef, head)


def routing_statistics(cfg: TrainConfig, policy: Policy) -> moe.RoutingStatistics | None:
    if cfg.model.num_experts is None:
        return None
    return moe.RoutingStatistics(policy.model, moe_layer_pattern(unwrap(policy.model).config), cfg.model.num_experts,
                                 moe.tracked_losses(cfg.model), cfg.logging.moe_per_layer)


def open_dataset(cfg: TrainConfig, source: str) -> tuple[SFTDataset, int]:
    """The training data and the model's vocabulary (the config's, else the tokenizer's)."""
    dataset = SFTDataset(cfg.data.prefix)
    tokenizer_vocab = dataset.meta["tokenizer"]["vocab_size"]
    vocab = cfg.model.vocab_size or tokenizer_vocab
    if tokenizer_vocab > vocab:
        raise ConfigError(f"{source}: model.vocab_size: {vocab} is smaller than the tokenizer's "
                          f"{tokenizer_vocab} tokens (data.prefix {cfg.data.prefix})")
    return dataset, vocab


def batch_settings(cfg: TrainConfig, spec: str) -> BatchSettings:
    """The data settings; packed samples become THD micro-batches on the Transformer Engine spec `spec`, each
    sample padded to a multiple of 2 * cp (times tp under sequence parallelism) and each micro-batch to what
    FP8 GEMMs need."""
    d, p = cfg.data, cfg.parallel
    settings = BatchSettings(d.seq_length, d.micro_batch_size, d.global_batch_size, d.packing, d.seed, d.epochs)
    if not (d.packing and spec == "te"):
        return settings
    split = p.cp * (p.tp if p.sp else 1)
    return replace(settings, thd_sample_multiple=2 * split,
                   thd_total_multiple=split * max(2, transformer_engine.fp8_token_multiple(cfg)))


def load_start(cfg: TrainConfig, policy: Policy) -> tuple[str | None, dict | None]:
    """Load checkpoint.init into the policy; returns its identity and Hugging Face origin (or None, None)."""
    if cfg.checkpoint.init is None:
        return None, None
    start = checkpoint.load(cfg.checkpoint.init, policy.model, base_only=cfg.lora.rank > 0)
    policy.optimizer.reload_model_params()  # mixed precision: the fp32 main parameters were copied at build time
    return start["checkpoint_id"], start.get("hf")  # Hugging Face config and tokenizer files


def setup(cfg: TrainConfig, source: str) -> Run:
    """Check the config, join the job, build the data, policy and reference, and resume where a save is."""
    from megatron.core import parallel_state

    stop_request = stop_signal.StopRequest().install()  # from here on, a stop signal waits for the first step
    device = setup_device(cfg.device)
    validate(cfg, source, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    check_for_device(cfg, source, device.type)
    dataset, vocab = open_dataset(cfg, source)
    pgs = parallel.initialize(device, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, seed=cfg.seed,
                              ep=cfg.parallel.ep, etp=cfg.parallel.etp)
    save_dir = cfg.checkpoint.save or os.path.join(cfg.output_dir, "checkpoints")
    lock = parallel.on_rank_zero(lambda: prepare_outputs(cfg, save_dir))
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    settings = batch_settings(cfg, transformer_engine.resolve_spec(cfg.model.spec, device.type))
    total_steps = SFTBatches(dataset, settings, dp_rank, dp_size).num_steps
    held_out = evaluate.open_held_out_sets(cfg, dataset, settings, dp_rank, dp_size)
    greedy = greedy_decoding(cfg, dataset, held_out)
    total_steps = min(total_steps, cfg.train_steps or total_steps)
    policy = build_policy(cfg, vocab, device, total_steps)
    start_id, hf_origin = load_start(cfg, policy)
    reference = build_reference(cfg, policy, vocab, device, pgs, dataset, start_id)
    run = Run(cfg, device, pgs, dataset, vocab, batches=None, total_steps=total_steps,
              stop_at=min(total_steps, cfg.stop_at_step or total_steps), policy=policy, reference=reference,
              loss_fn=policy_loss(cfg, policy, vocab, pgs, reference),
              save_dir=save_dir, start_id=start_id, hf_origin=hf_origin, lock=lock,
              routing=routing_statistics(cfg, policy), held_out=held_out, greedy=greedy, best_value={},
              stop_request=stop_request)
    resumed_from = resume(run)
    attach_held_out_references(run)
    run.best = checkpoint.read_best(run.save_dir, cfg.checkpoint.keep_best) if cfg.checkpoint.keep_best else None
    run.batches = SFTBatches(dataset, settings, dp_rank, dp_size, consumed_samples=run.consumed)
    if parallel.is_logging_rank():
        run.log = open_log(run, resumed_from)
    return run


# ---- resuming and saving ----------------------------------------------------------------------------------------

def prepare_outputs(cfg: TrainConfig, save_dir: str) -> paths.DirectoryLock:
    """Rank 0, before any work: the run's directories can be written, the save directory is consistent, nothing
    of an earlier run would be overwritten, and the run directory is locked for this run."""
    paths.check_writable_dir(cfg.output_dir, "output_dir")
    paths.check_writable_dir(save_dir, "checkpoint.save")
    checkpoint.check_save_dir(save_dir)
    lock = paths.DirectoryLock(cfg.output_dir, "output_dir")
    metrics = os.path.join(cfg.output_dir, "metrics.jsonl")
    if resume_path(cfg, save_dir) is None and os.path.isfile(metrics) and os.path.getsize(metrics):
        lock.release()
        raise paths.PathError(f"output_dir {cfg.output_dir}: holds an earlier run's metrics.jsonl but no checkpoint "
                              "to resume; choose another output_dir, or remove that run")
    return lock


def layout(cfg: TrainConfig) -> dict:
    """What a checkpoint records of the layout (an MoE model's: that its experts have their own optimizer at every
    EP, model.mark_expert_parameters)."""
    p = cfg.parallel
    saved = {"tp": p.tp, "pp": p.pp, "cp": p.cp, "ep": p.ep, "etp": p.etp or p.tp, "world": dist.get_world_size()}
    return saved if cfg.model.num_experts is None else dict(saved, expert_optimizer=True)


def resume_path(cfg: TrainConfig, save_dir: str) -> str | None:
    if cfg.checkpoint.load is not None:
        return cfg.checkpoint.load
    return save_dir if checkpoint.has_checkpoint(save_dir) else None


def optimizer_sharding(cfg: TrainConfig) -> str | None:
    """The distributed optimizer's checkpoint sharding type; None for the other optimizers."""
    return cfg.checkpoint.optimizer_sharding if cfg.optimizer.distributed else None


def override_schedule(policy: Policy, cfg: TrainConfig) -> None:
    """Make the scheduler about to load a checkpoint keep this config's values (megatron-core's
    override_opt_param_scheduler), and the optimizer's parameter groups, which carry their own peak and floor
    learning rates from the checkpoint, this config's lr and min_lr."""
    policy.scheduler.override_opt_param_scheduler = True
    for group in policy.optimizer.param_groups:
        group["max_lr"], group["min_lr"] = cfg.optimizer.lr, cfg.optimizer.min_lr


def check_resumed_optimizer(cfg: TrainConfig, state: dict, path: str) -> None:
    """The optimizer state in `path` must be loadable into this run's optimizer at this layout."""
    saved = state.get("optimizer_sharding")
    if (saved is not None) != cfg.optimizer.distributed:
        raise checkpoint.CheckpointError(
            f"{path}: was saved with optimizer.distributed {saved is not None}, this run has "
            f"{cfg.optimizer.distributed}: resume with the optimizer it was saved with")
    before, now = state.get("layout") or {}, vars(cfg.parallel)
    now = dict(now, etp=now["etp"] or now["tp"])
    if cfg.model.num_experts is not None and before.get("ep", 1) == 1 and not before.get("expert_optimizer"):
        raise checkpoint.CheckpointError(
            f"{path}: an MoE run saved at ep=1 by an earlier version, whose experts shared the dense optimizer; "
            f"its optimizer state does not load here: start a new run from its weights with checkpoint.init: {path}")
    keys = ("tp", "pp", "cp", "ep", "etp")
    before = dict({"ep": 1, "etp": before.get("tp")}, **before)  # saved before expert parallelism existed here
    if saved == "dp_reshardable" and any(before.get(k) != now[k] for k in keys):
        raise checkpoint.CheckpointError(
            f"{path}: its distributed-optimizer state (dp_reshardable) was saved at "
            + " ".join(f"{k}={before.get(k)}" for k in keys) + " and loads only there (this run: "
            + " ".join(f"{k}={now[k]}" for k in keys)
            + "); save with checkpoint.optimizer_sharding: fully_reshardable to change them")


def _setting(config: dict, key: str):
    for part in key.split("."):
        config = (config or {}).get(part)
    return config


def changed_settings(saved: dict, cfg: TrainConfig, keys) -> list[str]:
    """`key value (checkpoint value)` for each of `keys` this config sets differently from the saved config."""
    now = to_dict(cfg)
    return [f"{key} {_setting(now, key)} (checkpoint {_setting(saved, key)})" for key in keys
            if _setting(now, key) != _setting(saved, key)]


def check_resumable(cfg: TrainConfig, state: dict, path: str) -> None:
    """A training run's checkpoint, saved with this run's settings (or, for the schedule, overridden)."""
    if "scheduler" not in state:
        raise checkpoint.CheckpointError(f"{path}: a starting checkpoint (init_checkpoint or hf-to-megatron), not a "
                                         f"training run's; start from it with checkpoint.init: {path}")
    changed = changed_settings(state["config"], cfg, RUN_KEYS)
    if changed:
        raise checkpoint.CheckpointError(f"{path}: resuming with other settings: {', '.join(changed)}; a resumed run "
                                         "keeps them (start a new run from its weights with checkpoint.init)")
    changed = changed_settings(state["config"], cfg, SCHEDULE_KEYS)
    if changed and not cfg.checkpoint.override_schedule:
        raise checkpoint.CheckpointError(f"{path}: resuming with another learning-rate schedule: {', '.join(changed)};"
                                         " set checkpoint.override_schedule: true to recompute it from this config")
    check_resumed_optimizer(cfg, state, path)


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


def resume(run: Run) -> str | None:
    """Load the policy, optimizer, scheduler and counters from the checkpoint to resume from, if any."""
    path = resume_path(run.cfg, run.save_dir)
    if path is None:
        return None
    check_resumable(run.cfg, checkpoint.read_state(path), path)
    state = checkpoint.load(path, run.policy.model, run.policy.optimizer, layout=layout(run.cfg),
                            current_schedule=run.cfg.checkpoint.override_schedule)
    check_resumed_state(state, path, run.dataset, run.start_id)
    if run.cfg.checkpoint.override_schedule:  # this config's schedule, at the checkpoint's step
        override_schedule(run.policy, run.cfg)
    run.policy.scheduler.load_state_dict(state["scheduler"])
    run.iteration, run.consumed = state["iteration"], state["consumed_samples"]
    return path


def state_to_save(run: Run) -> dict:
    """The checkpoint's common `state` entry: what resuming, scoring and conversion read back."""
    return {"config": to_dict(run.cfg), "vocab_size": run.vocab, "scheduler": run.policy.scheduler.state_dict(),
            "consumed_samples": run.consumed, "dataset_fingerprint": run.dataset.fingerprint,
            "start_checkpoint_id": run.start_id, "layout": layout(run.cfg), "hf": run.hf_origin,
            "base": lora_base(run.cfg, run.start_id)}


def lora_base(cfg: TrainConfig, start_id: str | None) -> dict | None:
    """The checkpoint a LoRA run adapts, {"path", "checkpoint_id"}: its checkpoints then hold the adapters alone
    (checkpoint.save). None without LoRA, or from a random base (saved whole)."""
    if cfg.lora.rank == 0 or cfg.checkpoint.init is None:
        return None
    return {"path": os.path.abspath(checkpoint.resolve(cfg.checkpoint.init)), "checkpoint_id": start_id}


@contextlib.contextmanager
def parameters_gathered(ddp):
    """Under overlap_param_gather the updated parameters are gathered only by the next forward: gather them now
    (and stop the forward hooks meanwhile), as Megatron-LM does around a save."""
    if not ddp.use_forward_hook:
        yield
        return
    ddp.disable_forward_pre_hook()  # forces a synchronous gather
    try:
        yield
    finally:
        ddp.enable_forward_pre_hook()


def save_if_due(run: Run, force: bool = False) -> None:
    """Save at every checkpoint.interval, (checkpoint.save_final) at the iteration this invocation stops at, and
    when `force`d (a stop signal)."""
    interval, final = run.cfg.checkpoint.interval, run.cfg.checkpoint.save_final
    if force or (interval and run.iteration % interval == 0) or (final and run.iteration == run.stop_at):
        protect, best = best_to_keep(run)
        with parameters_gathered(run.policy.ddp):
            path = checkpoint.save(run.save_dir, run.iteration, run.policy.model, run.policy.optimizer,
                                   state_to_save(run), run.cfg.checkpoint.keep, optimizer_sharding(run.cfg),
                                   protect=protect, best=best)
        run.best = best or run.best
        if run.log is not None:
            run.log.print(f"saved checkpoint {path}" + (f" (best {best['keep_best']} {best['value']:.6g})"
                                                         if best else ""))


def best_to_keep(run: Run) -> tuple[int | None, dict | None]:
    """keep_best: the iteration no prune may remove, and this save's best_checkpoint.json record when it is the
    new best (else None)."""
    selector = run.cfg.checkpoint.keep_best
    if selector is None:
        return None, None
    value = run.best_value.pop(run.iteration, None)
    run.best_value.clear()  # figures of iterations never saved are no candidates
    kept = run.best["iteration"] if run.best else None
    if value is None or not math.isfinite(value):
        return kept, None
    lowest = KEEP_BEST_METRICS[selector.split("/", 1)[1]] == "lowest"
    if run.best is not None and not (value < run.best["value"] if lowest else value > run.best["value"]):
        return kept, None
    return run.iteration, {"keep_best": selector, "iteration": run.iteration, "value": value,
                           "path": os.path.abspath(checkpoint.iteration_dir(run.save_dir, run.iteration))}


# ---- logging ----------------------------------------------------------------------------------------------------

def open_log(run: Run, resumed_from: str | None) -> MetricsLog:
    cfg = run.cfg
    log = MetricsLog(cfg.output_dir, run.total_steps, cfg.logging.interval, cfg.logging.tensorboard,
                     cfg.logging.progress_bar, resume_at=run.iteration if resumed_from is not None else None)
    with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    if resumed_from is not None:
        log.print(f"resumed from {checkpoint.resolve(resumed_from)} at iteration {run.iteration}")
    return log


def step_record(iteration, consumed, lr, metrics, grad_norm, tokens, seconds, device) -> dict:
    record = {"iteration": iteration, "consumed_samples": consumed, "lr": lr}
    record.update({k: float(v) for k, v in metrics.items()})
    record.update(grad_norm=float(grad_norm or 0.0), tokens_per_s=tokens / seconds,
                  seconds_per_iteration=seconds, memory_gib=peak_memory_gib(device))
    return record



# ---- evaluation -------------------------------------------------------------------------------------------------

def greedy_decoding(cfg: TrainConfig, dataset: SFTDataset, held_out: list) -> tuple | None:
    """eval_generate: training's tokenizer and stop tokens, and each set's prompts (checked to fit)."""
    if not cfg.logging.eval_generate:
        return None
    from minorsft_megatron.data.tokenizer import TokenizerError, load_tokenizer
    from minorsft_megatron.generate import stop_ids

    path = dataset.meta["tokenizer"].get("path")
    try:
        tokenizer = load_tokenizer(path)
    except (TokenizerError, OSError, TypeError) as err:
        raise ConfigError(f"logging.eval_generate: decodes answers with data.prefix's tokenizer {path}, which "
                          f"cannot be loaded here ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
    for s in held_out:
        s.prompts = evaluate.prompts_and_answers(s.dataset, s.num_samples)
        evaluate.check_prompts_fit(s, cfg.logging.eval_max_new_tokens, cfg.model.max_position_embeddings)
    return tokenizer, stop_ids(tokenizer)


def attach_held_out_references(run: Run) -> None:
    """Each held-out set's reference: the run's reference model, or (cache) its step-0 cache on a resumed run
    (a fresh run writes it at its first evaluation)."""
    mode = run.cfg.reference.mode
    for s in run.held_out:
        s.reference = run.reference if mode in ("colocated", "base") else None
    if mode == "cache" and run.iteration > 0:
        evaluate.attach_cached_references(run.cfg, run.held_out, run.start_id)


def evaluate_if_due(run: Run) -> list[dict]:
    """Evaluate every held-out set when one is due after run.iteration steps; their records on the logging rank."""
    index = evaluate.evaluation_index(run.cfg, run.iteration, run.total_steps)
    if not run.held_out or index is None:
        return []
    k = run.cfg.logging.eval_generate
    records = []
    with parameters_gathered(run.policy.ddp), evaluate.evaluation_mode([run.policy.model]):
        for s in run.held_out:
            start = time.perf_counter()
            metrics = evaluate_held_out(run, s, generate=bool(k) and index % k == 0)
            record_best_value(run, s, metrics)
            if run.log is not None:
                records.append(evaluate.eval_record(s.name, run.iteration, run.consumed, s.num_samples, metrics,
                                                    time.perf_counter() - start))
                run.log.evaluation(records[-1])
    return records


def evaluate_held_out(run: Run, s, generate: bool) -> dict:
    """One set's metrics on the last pipeline stage ({} elsewhere); at step 0 of a fresh cache-mode run, its
    reference cache is written first."""
    cfg, d = run.cfg, run.cfg.data
    shape = (d.seq_length, d.micro_batch_size)
    if cfg.reference.mode == "cache" and s.reference is None:
        path = evaluate.cache_path(cfg, s.name)
        evaluate.write_step0_cache([run.policy.ddp], s, run.loss_fn.log_probs, run.pgs, *shape, run.device,
                                   evaluate.cache_meta(cfg, s, run.start_id), path)
        s.reference = evaluate.cached_reference(path, s, run.start_id)
    metrics = evaluate.evaluate_set([run.policy.ddp], s, run.loss_fn, run.pgs, *shape, run.device,
                                    has_kl=REF_LOGITS in run.loss_fn.spec.reads)
    if generate:
        tokenizer, stops = run.greedy
        matches = evaluate.exact_match_count(run.policy.model, s, tokenizer, stops, cfg.logging.eval_max_new_tokens,
                                             run.loss_fn.log_probs, run.pgs.dp, run.device)
        if metrics:
            metrics["accuracy"] = matches / max(s.num_samples, 1)
    return metrics


def record_best_value(run: Run, s, metrics: dict) -> None:
    """keep_best: the selecting figure of this evaluation, on every rank. Collective: one all-reduce (max) over
    the world (the last pipeline stage holds the figure)."""
    selector = run.cfg.checkpoint.keep_best
    if selector is None or selector.split("/", 1)[0] != s.name:
        return
    metric = selector.split("/", 1)[1]
    value = torch.tensor([float(metrics[metric]) if metric in metrics else float("-inf")], dtype=torch.float64,
                         device=run.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    run.best_value[run.iteration] = value.item()  # -inf or NaN: no candidate


# ---- the loop ---------------------------------------------------------------------------------------------------

def train_step(run: Run, micro_batches) -> dict:
    """One optimizer step on this rank's micro-batches; returns the step's record on the logging rank, else {}."""
    from megatron.core import parallel_state

    step_start = time.perf_counter()
    d, policy = run.cfg.data, run.policy
    tokens = int((run.dataset.lengths[run.batches.global_batch(run.iteration)] - 1).sum())
    micro_batches = [mb.to(run.device) for mb in micro_batches]
    if run.reference is not None:
        run.reference.attach(micro_batches)
    policy.ddp.zero_grad_buffer()
    policy.optimizer.zero_grad()
    if run.routing is not None:
        run.routing.start_step()
    aux_scale = moe.step_scale(micro_batches, run.loss_fn.spec.denominator, run.pgs.dp) \
        if moe.has_auxiliary_losses(run.cfg.model) else None
    with moe.auxiliary_loss_scale(aux_scale):
        stats = forward_backward([policy.ddp], micro_batches, run.loss_fn, d.seq_length, d.micro_batch_size)
    lr = policy.optimizer.param_groups[0]["lr"]  # the rate this step applies
    fp16 = run.cfg.precision.dtype == "fp16"
    loss_scale = policy.optimizer.get_loss_scale().clone() if fp16 else None  # the scale this backward used
    updated, grad_norm, _ = policy.optimizer.step()
    if updated:  # a step the fp16 loss scaler skipped (overflow) does not advance the schedule
        policy.scheduler.step(increment=1)
    run.iteration, run.consumed = run.iteration + 1, run.consumed + d.global_batch_size
    metrics = {}
    if parallel_state.is_pipeline_last_stage():
        metrics = reduce_step_metrics(stats, run.pgs.dp_cp, has_reference=run.reference is not None,
                                      has_kl=REF_LOGITS in run.loss_fn.spec.reads)
    if run.routing is not None:  # every rank
        p = run.cfg.parallel
        metrics.update(run.routing.reduce(len(micro_batches), dist.group.WORLD, p.tp, p.cp, run.pgs.dp.size(), p.sp))
    record = log_step(run, lr, metrics, grad_norm, tokens, step_start, loss_scale, updated)
    check_step(run, metrics, grad_norm)
    return record


def log_step(run: Run, lr, metrics, grad_norm, tokens, step_start, loss_scale, updated) -> dict:
    """The step's record on the logging rank (metrics.jsonl, TensorBoard, the console), else {}."""
    if run.log is None:
        return {}
    record = step_record(run.iteration, run.consumed, lr, metrics, grad_norm, tokens,
                         time.perf_counter() - step_start, run.device)
    if loss_scale is not None:  # fp16; a skipped step: an overflow, and the weights were left alone
        record.update(loss_scale=float(loss_scale), skipped=not updated)
    run.log.step(record)
    return record


def check_step(run: Run, metrics: dict, grad_norm) -> None:
    """Every rank: stop, before anything is saved, at a non-finite loss (last stage) or gradient norm (an fp16 step
    the loss scaler skipped has none, and is fine); and agree on a stop signal any rank received (run.stop_signal:
    the largest signal number, 0 for none). Collective: one all-reduce (min) of two flags."""
    finite = grad_norm is None or math.isfinite(grad_norm)
    if "loss" in metrics:
        finite = finite and bool(torch.isfinite(metrics["loss"]))
    flags = torch.tensor([1.0 if finite else 0.0, -float(run.stop_request.received)], device=run.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    finite_everywhere, negated_signal = flags.tolist()  # one host copy
    run.stop_signal = int(-negated_signal)
    if finite_everywhere < 1:
        kept = checkpoint.latest(run.save_dir)
        raise NonFiniteError(f"iteration {run.iteration}: the loss or the gradient norm is not finite; stopped "
                             "without saving. " + (f"The last complete checkpoint is {kept}" if kept else
                             "No checkpoint was saved") + " (a lower optimizer.lr, or check the data and the reference)")


def finish(run: Run) -> None:
    if run.log is not None:
        saved = run.cfg.checkpoint.save_final or run.cfg.checkpoint.interval
        run.log.print(f"done: metrics in {run.log.path} (TensorBoard: "
                      f"{os.path.join(run.cfg.output_dir, 'tensorboard')}), "
                      + (f"checkpoints in {run.save_dir}" if saved else "no checkpoint saved"))
        run.log.close()


def train(cfg: TrainConfig, source: str) -> dict:
    """Run the job this process belongs to; returns the last step's metrics on the logging rank."""
    run = setup(cfg, source)
    record = {}
    if run.iteration == 0:  # a fresh run: evaluation at step 0 (a resumed run logged its own before saving)
        evaluate_if_due(run)
    for micro_batches in run.batches:
        if run.iteration >= run.stop_at:
            break
        record = train_step(run, micro_batches)
        evaluate_if_due(run)
        save_if_due(run, force=bool(run.stop_signal))
        if run.stop_signal:
            break
    finish(run)
    if run.stop_signal and run.log is not None:
        print(f"stopped on {stop_signal.name(run.stop_signal)} at iteration {run.iteration}: checkpoint "
              f"{checkpoint.iteration_dir(run.save_dir, run.iteration)} saved; the same command resumes from it",
              flush=True)
    return record


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m minorsft_megatron.train", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (see minorsft_megatron/config.py)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optimizer.lr=1e-5 parallel.tp=2")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    def job():
        args = parse_args(argv)
        train(load_config(args.config, args.overrides), Source.of(args.config, args.overrides))

    return run_main(job)


if __name__ == "__main__":
    sys.exit(main())
