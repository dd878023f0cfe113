"""Evaluation during training: held-out sets forward-only through the training schedule, reduced exactly.

Each held-out set (data.valid) is its first logging.eval_samples samples in sample order, split into contiguous
data-parallel shares and laid out as training lays out its micro-batches (padded or packed rows, THD), so every
evaluation sees the same samples whatever the layout. The policy runs them forward-only through megatron-core's
pipeline schedule with the training loss function, which returns per-micro-batch sums and counts; those are
reduced once over data- and context-parallel ranks (forward_step.reduce_step_metrics) and divided once: answer
NLL per token, m_theta, the MinorSFT weights' mean and minimum and the loss's own value, exact under every layout.

The reference's log-probs come from the run's reference model (colocated, or LoRA's base), or with
reference.mode cache from OUTPUT_DIR/reference/SET.jsonl: a cache written at step 0 of a fresh run, where the
policy is the reference (it names the dataset and the starting checkpoint, as `score`'s caches do).

With logging.eval_generate, every K-th evaluation also decodes greedy answers to each sample's prompt (its tokens
before the last answer) and counts exact matches against the answer, cut and compared as `generate` does.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from minorsft_megatron import paths
from minorsft_megatron.config import ConfigError, TrainConfig, valid_sets
from minorsft_megatron.data.dataset import BatchSettings, SFTDataset, check_samples_fit, held_out_micro_batches
from minorsft_megatron.forward_step import (
    LogProbCollector,
    forward_log_prob_parts,
    forward_losses,
    reduce_step_metrics,
)
from minorsft_megatron.reference import CachedReference
from minorsft_megatron.reference_cache import write_cache


@dataclass
class HeldOutSet:
    """One validation set of a run, as this rank evaluates it."""

    name: str
    key: str
    """The config key that names it (data.valid.NAME), for messages."""
    dataset: SFTDataset
    num_samples: int
    """The samples evaluated: the first num_samples of the dataset."""
    micro_batches: list
    """This DP rank's micro-batches (CPU), the same at every evaluation."""
    reference: object = None
    """What sets each micro-batch's reference log-probs (CachedReference, the run's reference model), or None."""
    prompts: list | None = None
    """eval_generate: (prompt ids, answer ids) of each sample, in sample order."""


# ---- opening ----------------------------------------------------------------------------------------------------

def evaluation_index(cfg: TrainConfig, iteration: int, total_steps: int) -> int | None:
    """The number of the evaluation due after `iteration` steps (0: the one at step 0), None when none is due.
    Evaluations run at step 0, every logging.eval_interval steps, and after the last step."""
    interval = cfg.logging.eval_interval
    on_interval = bool(interval) and iteration % interval == 0
    if not (iteration == 0 or iteration == total_steps or on_interval):
        return None
    earlier = iteration // interval if interval else 0  # those at interval multiples 1..iteration
    last = iteration == total_steps and not on_interval and iteration > 0
    return earlier + int(last)


def set_key(cfg: TrainConfig, name: str) -> str:
    return "data.valid" if isinstance(cfg.data.valid, str) else f"data.valid.{name}"


def check_same_preprocessing(held_out: SFTDataset, train: SFTDataset, key: str) -> None:
    """A held-out set must be made with training's tokenizer and chat template (their sha256 in the sidecars)."""
    for part in ("tokenizer", "chat_template"):
        mine, theirs = held_out.meta.get(part) or {}, train.meta.get(part) or {}
        if mine.get("sha256") != theirs.get("sha256"):
            raise ConfigError(f"{key}: {held_out.prefix} was preprocessed with another {part.replace('_', ' ')} "
                              f"({mine.get('name') or mine.get('path')}) than data.prefix {train.prefix} "
                              f"({theirs.get('name') or theirs.get('path')}); preprocess it with training's")


def open_held_out_sets(cfg: TrainConfig, train: SFTDataset, settings: BatchSettings, dp_rank: int,
                       dp_size: int) -> list[HeldOutSet]:
    """Every data.valid set, checked against training's data and this rank's micro-batches built (no reference)."""
    sets = []
    for name, prefix in valid_sets(cfg).items():
        key = set_key(cfg, name)
        dataset = SFTDataset(prefix)
        check_same_preprocessing(dataset, train, key)
        check_samples_fit(dataset, settings.seq_length, f"{key} {prefix}")
        n = min(len(dataset), cfg.logging.eval_samples or len(dataset))
        batches = held_out_micro_batches(dataset, settings, n, dp_rank, dp_size)
        sets.append(HeldOutSet(name, key, dataset, n, batches))
    return sets


def cache_path(cfg: TrainConfig, name: str) -> str:
    return os.path.join(cfg.output_dir, "reference", f"{name}.jsonl")


def attach_cached_references(cfg: TrainConfig, sets: list[HeldOutSet], start_id: str | None) -> None:
    """reference.mode cache on a resumed run: each set's cache from step 0, refused in one line when missing."""
    for s in sets:
        path = cache_path(cfg, s.name)
        if not os.path.isfile(path):
            start = cfg.checkpoint.init or "the starting checkpoint"
            raise ConfigError(f"{s.key}: reference.mode cache: {path} is missing (a fresh run writes it at step 0); "
                              f"write it with python -m minorsft_megatron.score --load {start} --data "
                              f"{s.dataset.prefix} --out {path}")
        s.reference = cached_reference(path, s, start_id)


def cached_reference(path: str, s: HeldOutSet, start_id: str | None) -> CachedReference:
    reference = CachedReference(path, s.dataset.fingerprint, start_id)
    if len(reference.logp_sum) < s.num_samples:
        raise ConfigError(f"{s.key}: {path} holds {len(reference.logp_sum)} samples, fewer than the {s.num_samples} "
                          "evaluated (logging.eval_samples)")
    return reference


# ---- the step-0 reference cache ---------------------------------------------------------------------------------

@torch.no_grad()
def write_step0_cache(model: list, s: HeldOutSet, log_probs, pgs, seq_length: int, micro_batch_size: int,
                      device, meta: dict, path: str) -> None:
    """Score `s` with the policy at step 0 (it is the reference then) and write its cache on rank 0.

    Collectives: the forward-only schedule, one gather_object over the world, two barriers."""
    from megatron.core import parallel_state

    batches = [mb.to(device) for mb in s.micro_batches]
    collector = LogProbCollector(log_probs, pgs.cp)
    parts = forward_log_prob_parts(model, batches, collector, seq_length, micro_batch_size)
    rows = []
    reporter = parallel_state.get_tensor_model_parallel_rank() == 0 == parallel_state.get_context_parallel_rank()
    if parts and reporter:
        for mb, part in zip(batches, parts):
            for i, logp, m in zip(mb.sample_index.tolist(), part.logp_sum.double().tolist(),
                                  part.num_answer_tokens.tolist()):
                if i >= 0:  # -1: a row of padding alone
                    rows.append((i, logp, m))
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(rows, gathered, dst=0)
    if dist.get_rank() == 0:
        found = sorted(row for part in gathered for row in part)
        assert [row[0] for row in found] == list(range(s.num_samples)), "every held-out sample scored once"
        paths.make_parent(path)
        write_cache(path, *zip(*found), dict(meta, num_samples=s.num_samples))
    dist.barrier()


def cache_meta(cfg: TrainConfig, s: HeldOutSet, start_id: str | None) -> dict:
    return {"checkpoint": {"path": cfg.checkpoint.init and os.path.abspath(cfg.checkpoint.init),
                           "checkpoint_id": start_id, "iteration": 0},
            "dataset": {"prefix": os.path.abspath(s.dataset.prefix), "fingerprint": s.dataset.fingerprint},
            "precision": cfg.precision.dtype, "written_by": "train (step 0)"}


# ---- one evaluation ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def evaluation_mode(modules):
    """Eval mode for `modules`, and every random generator left exactly as it was (training's RNG and so its
    metrics do not change whether or not evaluation runs)."""
    from minorsft_megatron.checkpoint import rng_state, set_rng_state

    saved, was_training = rng_state(), [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(modules, was_training):
            m.train(training)
        set_rng_state(saved)


@torch.no_grad()
def evaluate_set(model: list, s: HeldOutSet, loss_fn, pgs, seq_length: int, micro_batch_size: int, device,
                 has_kl: bool) -> dict:
    """`s` forward-only through the schedule with the training loss function; on the last pipeline stage the
    set's metrics (detached 0-d tensors, loss.metrics_from_stats plus nll_per_token), {} elsewhere.

    Collectives: the reference's and the policy's forward-only schedules; on the last stage one all-reduce (sum)
    and one (max) over DP x CP."""
    from megatron.core import parallel_state

    batches = [mb.to(device) for mb in s.micro_batches]
    if s.reference is not None:
        s.reference.attach(batches)
    stats = forward_losses(model, batches, loss_fn, seq_length, micro_batch_size)
    if not parallel_state.is_pipeline_last_stage():
        return {}
    return reduce_step_metrics(stats, pgs.dp_cp, has_reference=s.reference is not None, has_kl=has_kl)


# ---- greedy answers ---------------------------------------------------------------------------------------------

def prompts_and_answers(dataset: SFTDataset, num_samples: int) -> list[tuple[list[int], list[int]]]:
    """Each sample's prompt (its tokens before its last answer span) and that answer's tokens."""
    pairs = []
    for i in range(num_samples):
        tokens, mask = dataset.tokens(i), dataset.answer_mask(i).astype(bool)
        where = np.flatnonzero(mask)
        if not where.size:
            pairs.append((tokens.tolist(), []))
            continue
        end = int(where[-1]) + 1
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        pairs.append((tokens[:start].tolist(), tokens[start:end].tolist()))
    return pairs


def check_prompts_fit(s: HeldOutSet, max_new_tokens: int, max_positions: int) -> None:
    longest = max((len(p) for p, _ in s.prompts), default=0)
    if longest + max_new_tokens > max_positions:
        raise ConfigError(f"logging.eval_max_new_tokens: {max_new_tokens}: {s.key}'s longest prompt ({longest} "
                          f"tokens) plus the answer would pass the model's {max_positions} positions")


def cut_answer(ids: list[int], stops: set[int]) -> list[int]:
    """An answer's tokens up to its first stop token (EOS, the template's end of turn), as `generate` returns."""
    for k, token in enumerate(ids):
        if token in stops:
            return ids[:k]
    return ids


@torch.no_grad()
def exact_match_count(model, s: HeldOutSet, tokenizer, stops: set[int], max_new_tokens: int, log_probs, dp_group,
                      device) -> torch.Tensor:
    """The number of samples of `s` whose greedy answer matches (stripped texts equal), on every rank.

    This DP rank decodes samples dp_rank, dp_rank + dp, ...; collectives: the TP all-gathers of decoding and one
    all-reduce (sum) over `dp_group`."""
    from minorsft_megatron.generate import greedy, same_length_batches

    rank, size = dist.get_rank(dp_group), dist.get_world_size(dp_group)
    pairs = [(p, None) for p, _ in s.prompts]
    matches = 0
    for batch in same_length_batches(pairs, range(rank, s.num_samples, size), 32):
        answers = greedy(model, [s.prompts[i][0] for i in batch], stops, max_new_tokens, log_probs, device)
        for i, new in zip(batch, answers):
            reference = tokenizer.decode(cut_answer(s.prompts[i][1], stops))
            matches += tokenizer.decode(new).strip() == reference.strip()
    count = torch.tensor([float(matches)], dtype=torch.float64, device=device)
    dist.all_reduce(count, group=dp_group)
    return count[0]


def eval_record(name: str, iteration: int, consumed: int, num_samples: int, metrics: dict, seconds: float) -> dict:
    """One set's evaluation as metrics.jsonl holds it (marked by "eval": its name)."""
    record = {"eval": name, "iteration": iteration, "consumed_samples": consumed, "num_samples": num_samples}
    record.update({k: float(v) for k, v in metrics.items()})
    record["seconds"] = seconds
    return record

