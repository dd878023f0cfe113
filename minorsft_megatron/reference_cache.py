"""The reference cache's file format, and the atomic JSONL writer the tools share.

Written by `python -m minorsft_megatron.score`: FILE.jsonl with one line per sample in sample order,
`{"index": i, "logp_sum": float, "num_answer_tokens": int}`, and FILE.jsonl.meta.json naming the checkpoint
(path, checkpoint_id, iteration) and the dataset (prefix, fingerprint) it was computed from.
"""

from __future__ import annotations

import json
import math
import os

import torch

from minorsft_megatron.errors import UserError


class ReferenceCacheError(UserError):
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
            if not math.isfinite(sums[int(row["index"])]):
                raise ReferenceCacheError(f"{path}:{number}: logp_sum is {row['logp_sum']}, not a finite number")
    if sorted(sums) != list(range(len(sums))):
        raise ReferenceCacheError(f"{path}: sample indices are not 0..{len(sums) - 1}")
    order = range(len(sums))
    return (meta, torch.tensor([sums[i] for i in order], dtype=torch.float64),
            torch.tensor([counts[i] for i in order], dtype=torch.int64))
