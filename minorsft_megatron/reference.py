"""The frozen reference: co-located beside the policy, or a cache of its per-sample log-prob sums.

Either way, what reaches the policy's loss is `ref_logp_sum` `[n]` on each micro-batch: one float per sample,
needed on the last pipeline stage only.

Cache format (written by `python -m minorsft_megatron.score`): FILE.jsonl with one line per sample in sample
order, `{"index": i, "logp_sum": float, "num_answer_tokens": int}`, and FILE.jsonl.meta.json naming the
checkpoint (path, checkpoint_id, iteration) and the dataset (prefix, fingerprint) it was computed from.
"""

from __future__ import annotations

import json
import os

import torch

from minorsft_megatron.forward_step import (
    SFTLossFunction,
    collect_logp_sums,
    forward_backward,
    merge_micro_batches,
)


class ReferenceCacheError(ValueError):
    """A cache that does not belong to this run, or is malformed; one line naming both sides."""


def meta_path(cache_path: str) -> str:
    return f"{cache_path}.meta.json"


def write_jsonl(path: str, rows) -> None:
    """One JSON object per line, written under a temporary name and renamed into place."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, path)


def write_cache(path: str, index, logp_sum, num_answer_tokens, meta: dict) -> None:
    """Write the cache atomically (temporary names, then rename: data first, meta last)."""
    tmp, tmp_meta = f"{path}.tmp{os.getpid()}", f"{meta_path(path)}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for i, s, n in zip(index, logp_sum, num_answer_tokens):
            f.write(json.dumps({"index": int(i), "logp_sum": float(s), "num_answer_tokens": int(n)}) + "\n")
    with open(tmp_meta, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    if os.path.exists(meta_path(path)):
        os.remove(meta_path(path))
    os.replace(tmp, path)
    os.replace(tmp_meta, meta_path(path))


def read_cache(path: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(meta, logp_sum [N] float64, num_answer_tokens [N] int64), indexed by sample index."""
    if not os.path.isfile(meta_path(path)):
        raise ReferenceCacheError(f"{meta_path(path)}: missing; write caches with python -m minorsft_megatron.score")
    with open(meta_path(path), encoding="utf-8") as f:
        meta = json.load(f)
    sums, counts = {}, {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
                sums[int(row["index"])], counts[int(row["index"])] = float(row["logp_sum"]), int(row["num_answer_tokens"])
            except (ValueError, KeyError, TypeError) as err:
                raise ReferenceCacheError(f"{path}:{number}: not a cache line ({err})")
    if sorted(sums) != list(range(len(sums))):
        raise ReferenceCacheError(f"{path}: sample indices are not 0..{len(sums) - 1}")
    order = range(len(sums))
    return (meta, torch.tensor([sums[i] for i in order], dtype=torch.float64),
            torch.tensor([counts[i] for i in order], dtype=torch.int64))


class CachedReference:
    """Reference log-prob sums looked up by `sample_index`; refuses a cache of another checkpoint or dataset."""

    def __init__(self, path: str, dataset_fingerprint: str, start_checkpoint_id: str | None):
        meta, self.logp_sum, self.num_answer_tokens = read_cache(path)
        cached_data, cached_ckpt = meta["dataset"]["fingerprint"], meta["checkpoint"]["checkpoint_id"]
        if cached_data != dataset_fingerprint:
            raise ReferenceCacheError(
                f"{path}: computed on dataset {cached_data[:12]} ({meta['dataset']['prefix']}), but this run "
                f"trains on dataset {dataset_fingerprint[:12]}"
            )
        if cached_ckpt != start_checkpoint_id:
            raise ReferenceCacheError(
                f"{path}: computed with checkpoint {cached_ckpt} ({meta['checkpoint']['path']}), but this run "
                f"starts from {start_checkpoint_id or 'a random initialisation'}"
            )

    def attach(self, micro_batches) -> None:
        for mb in micro_batches:
            mb.ref_logp_sum = self.logp_sum[mb.sample_index.cpu()].to(torch.float32).to(mb.tokens.device)


class ColocatedReference:
    """A frozen GPTModel with the policy's layout, run forward-only through the same pipeline schedule.

    `merge` policy micro-batches are scored as one larger micro-batch (when they divide evenly).
    """

    def __init__(self, model, loss_function: SFTLossFunction, device, seq_length: int, micro_batch_size: int,
                 offload: bool = False, merge: int = 1):
        self.model, self.loss_function, self.device, self.offload = model, loss_function, device, offload
        self.seq_length, self.micro_batch_size, self.merge = seq_length, micro_batch_size, merge
        self.model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        if offload:
            self.model.to("cpu")

    @torch.no_grad()
    def attach(self, micro_batches) -> None:
        """Score the whole global batch; on the last stage, set each micro-batch's `ref_logp_sum`."""
        k = self.merge if len(micro_batches) % self.merge == 0 else 1
        batches = [merge_micro_batches(micro_batches[i : i + k]) for i in range(0, len(micro_batches), k)]
        if self.offload:
            self.model.to(self.device)
        stats = forward_backward([self.model], batches, self.loss_function, self.seq_length,
                                 self.micro_batch_size * k, forward_only=True)
        if self.offload:
            self.model.to("cpu")
        if not stats:  # not the last pipeline stage: the policy's loss is computed elsewhere
            return
        logp_sum, _ = collect_logp_sums(stats)
        at = 0
        for mb in micro_batches:
            n = len(mb.sample_index)
            mb.ref_logp_sum = logp_sum[at : at + n].detach().to(torch.float32)
            at += n
