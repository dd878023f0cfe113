"""Per-sample answer log-prob sums of a checkpoint on a dataset: the reference cache, and a deviation meter.

    torchrun --nproc-per-node N -m minorsft_megatron.score --load CKPT [--tp T --pp P --cp C]
        (--data PREFIX | --jsonl FILE --tokenizer PATH [--chat-template NAME]) --out FILE.jsonl
        [--precision bf16|fp16|fp32|fp8] [--micro-batch-size B] [--reference BASE.jsonl] [--per-token F.jsonl]

Writes FILE.jsonl, one line per sample in sample order whatever the layout:
`{"index": i, "logp_sum": float, "num_answer_tokens": int}`, and FILE.jsonl.meta.json with the checkpoint's
identity and the dataset's fingerprint (a training run given this cache checks both). With `--reference`
(a cache of the base model on the same data) it also prints m_theta, the mean of (logp - ref_logp) / m: how
far this checkpoint has moved from its base. `--load` alone is enough: the checkpoint holds its model config.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from minorsft_megatron import checkpoint, parallel, paths, transformer_engine
from minorsft_megatron.cli import ArgumentParser, positive_int, run_main
from minorsft_megatron.config import DTYPES, ConfigError, ParallelConfig, TrainConfig, from_dict
from minorsft_megatron.data.batch import padded_micro_batch
from minorsft_megatron.data.dataset import SFTDataset
from minorsft_megatron.device import setup_device
from minorsft_megatron.forward_step import LogProbCollector, forward_log_probs
from minorsft_megatron.model import build_model, output_log_probs
from minorsft_megatron.reference_cache import meta_path, read_cache, write_cache, write_jsonl

SEQ_MULTIPLE = 8


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m minorsft_megatron.score", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory, or a save directory (its latest)")
    p.add_argument("--tp", type=positive_int, default=1)
    p.add_argument("--pp", type=positive_int, default=1)
    p.add_argument("--cp", type=positive_int, default=1, help="context-parallel size (Transformer Engine spec)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", metavar="PREFIX", help="a dataset written by tools/preprocess_sft_data.py")
    data.add_argument("--jsonl", metavar="FILE", help="SFT records, preprocessed on the fly (needs --tokenizer)")
    p.add_argument("--tokenizer", help="with --jsonl")
    p.add_argument("--chat-template", default=None, help="with --jsonl (default: auto if available, else none)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl")
    p.add_argument("--precision", choices=DTYPES + ("fp8",), default=None,
                   help="default: the checkpoint config's reference.precision (fp8: bf16 weights, FP8 compute)")
    p.add_argument("--micro-batch-size", type=positive_int, default=8)
    p.add_argument("--reference", metavar="BASE.jsonl", help="a cache of the base model: print m_theta against it")
    p.add_argument("--per-token", metavar="FILE.jsonl",
                   help="also write each sample's answer-token log-probs: {\"index\": i, \"token_logp\": [...]}")
    args = p.parse_args(argv)
    if args.jsonl and not args.tokenizer:
        p.error("--jsonl needs --tokenizer")
    if args.per_token and args.cp > 1:
        p.error("--per-token needs --cp 1 (each context-parallel rank holds only its part of every sample)")
    return args


def checkpoint_config(path: str, tp: int, pp: int, cp: int = 1) -> tuple[TrainConfig, dict]:
    state = checkpoint.read_state(path)
    cfg = from_dict(TrainConfig, state["config"], f"{path} (saved config)")
    cfg.parallel = ParallelConfig(tp=tp, pp=pp, cp=cp)
    return cfg, state


def score_seq_length(dataset: SFTDataset, cp: int, fp8_multiple: int) -> int:
    """Positions per row: the longest sample, rounded up to SEQ_MULTIPLE, to the 2 * cp chunks context
    parallelism splits a row into, and so that FP8 GEMMs get a multiple of `fp8_multiple` tokens per rank."""
    multiple = math.lcm(SEQ_MULTIPLE, 2 * cp if cp > 1 else 1, fp8_multiple * cp)
    return int(math.ceil((dataset.lengths.max() - 1) / multiple) * multiple)


def check_paths(args) -> None:
    """Before anything is read or written: the outputs can be written and replace no input."""
    paths.check_writable_file(args.out, "--out")
    if args.per_token:
        paths.check_writable_file(args.per_token, "--per-token")
    data_files = [f"{args.data}{suffix}" for suffix in (".json", "_tokens.bin", "_tokens.idx", "_answer_mask.bin",
                                                           "_answer_mask.idx")] if args.data else []
    inputs = {"--jsonl": args.jsonl, "--tokenizer": args.tokenizer, "--reference": args.reference,
              "--reference's meta": args.reference and meta_path(args.reference), "--load": args.load}
    inputs.update({f"--data {path}": path for path in data_files})
    paths.check_apart({"--out": args.out, "--out's meta": meta_path(args.out), "--per-token": args.per_token}, inputs)


def prepare_dataset(args, workdir: str) -> str:
    """The dataset prefix to score: --data, or --jsonl preprocessed by rank 0 into `workdir` (an error there is
    raised on every rank)."""
    if args.data:
        return args.data
    prefix = os.path.join(workdir, "data")

    def preprocess_jsonl():
        from minorsft_megatron.data.preprocess import PreprocessSettings, preprocess

        os.makedirs(workdir, exist_ok=True)
        preprocess(PreprocessSettings(inputs=[args.jsonl], tokenizer=args.tokenizer, output_prefix=prefix,
                                      chat_template=args.chat_template), log=lambda *_: None)

    parallel.on_rank_zero(preprocess_jsonl)
    return prefix


def check_dataset(args, dataset: SFTDataset, vocab_size: int) -> None:
    """The checkpoint can score the dataset's tokens, and --reference was scored on the same samples."""
    tokenizer_vocab = dataset.meta["tokenizer"]["vocab_size"]
    if tokenizer_vocab > vocab_size:
        raise ConfigError(f"{dataset.prefix}: its tokenizer has {tokenizer_vocab} tokens, more than the checkpoint "
                          f"{args.load}'s vocabulary of {vocab_size}: score it with the model it was trained for")
    if args.reference:
        ref_meta = read_cache(args.reference)[0]
        if ref_meta["dataset"]["fingerprint"] != dataset.fingerprint:
            raise ConfigError(f"--reference {args.reference}: scored on another dataset "
                              f"({ref_meta['dataset']['fingerprint'][:12]}, not {dataset.fingerprint[:12]})")


def rank_micro_batches(dataset: SFTDataset, seq_length: int, mbs: int, dp_rank: int, dp_size: int):
    """This DP rank's contiguous share of all samples, in micro-batches of `mbs` rows. Every rank runs the same
    number; short ones repeat their first sample in rows marked not to keep. Returns (batches, keep masks)."""
    n = len(dataset)
    per_rank = math.ceil(math.ceil(n / dp_size) / mbs) * mbs
    mine = np.arange(dp_rank * per_rank, min((dp_rank + 1) * per_rank, n))
    keep = np.zeros(per_rank, dtype=bool)
    keep[: len(mine)] = True
    filler = mine[0] if len(mine) else 0
    rows = np.concatenate([mine, np.full(per_rank - len(mine), filler)])
    batches = [padded_micro_batch(dataset, rows[i : i + mbs], seq_length) for i in range(0, per_rank, mbs)]
    return batches, keep


@dataclass
class ScoredPart:
    """What one scoring rank (TP rank 0 of a last-stage DP rank) found for its share of the samples."""

    index: list[int]
    """Dataset index of each sample."""
    logp_sum: list[float]
    num_answer_tokens: list[int]
    token_logp: list[list[float]] | None = None
    """Each sample's answer-token log-probs (--per-token)."""


def score_rank_share(args, cfg, state, dataset, device, pgs, precision: str):
    """Score this rank's share of `dataset` with the checkpoint; returns (its ScoredPart or None, the loaded
    checkpoint's state). Only TP and CP rank 0 of the last pipeline stage returns a part."""
    from megatron.core import parallel_state

    role = transformer_engine.role_precision(cfg, "score", precision)
    transformer_engine.check_fp8(role.fp8, device.type, role.fp8_recipe)
    transformer_engine.check_context_parallel_and_packing(
        args.cp, False, transformer_engine.resolve_spec(cfg.model.spec, device.type))
    fp8_multiple = transformer_engine.FP8_TOKEN_MULTIPLE[role.fp8_recipe] if role.fp8 else 1
    seq_length = score_seq_length(dataset, args.cp, fp8_multiple)
    model, _ = build_model(cfg, role, state["vocab_size"], device, initialize=False, adapters=cfg.lora.rank > 0)
    loaded = checkpoint.load(args.load, model)
    model.eval()
    batches, keep = rank_micro_batches(dataset, seq_length, args.micro_batch_size,
                                       parallel_state.get_data_parallel_rank(),
                                       parallel_state.get_data_parallel_world_size())
    log_probs = output_log_probs(model, cfg.loss.logprob_chunk_size, state["vocab_size"], pgs.tp, False)
    collector = LogProbCollector(log_probs, cp_group=pgs.cp, keep_token_log_probs=args.per_token is not None)
    scored = forward_log_probs([model], [b.to(device) for b in batches], collector, seq_length,
                               args.micro_batch_size)
    reporter = parallel_state.get_tensor_model_parallel_rank() == 0 == parallel_state.get_context_parallel_rank()
    if scored is None or not reporter:  # every TP and CP rank holds the same sums: one of them reports
        return None, loaded
    index = torch.cat([b.sample_index for b in batches])
    k = torch.from_numpy(keep)
    tokens = answer_token_log_probs(scored.token_logp, batches) if args.per_token else None
    return ScoredPart(index[k].tolist(), scored.logp_sum.cpu().double()[k].tolist(),
                      scored.num_answer_tokens.cpu()[k].tolist(),
                      [t for t, kept in zip(tokens, keep) if kept] if tokens else None), loaded


def score(args) -> None:
    parallel.check_layout(int(os.environ.get("WORLD_SIZE", "1")), args.tp, args.pp, args.cp)  # before reading
    check_paths(args)
    cfg, state = checkpoint_config(args.load, args.tp, args.pp, args.cp)
    precision = args.precision or cfg.reference.precision
    device = setup_device(cfg.device if cfg.device != "cuda" or torch.cuda.is_available() else None)
    pgs = parallel.initialize(device, tp=args.tp, pp=args.pp, cp=args.cp, seed=cfg.seed)
    workdir = f"{args.out}.tmp-data"  # --jsonl is preprocessed here by rank 0, removed at the end
    try:
        dataset = SFTDataset(prepare_dataset(args, workdir))
        check_dataset(args, dataset, state["vocab_size"])
        part, loaded = score_rank_share(args, cfg, state, dataset, device, pgs, precision)
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(part, parts, dst=0)
        parallel.on_rank_zero(lambda: write_result(args, [p for p in parts if p is not None], dataset, loaded,
                                                   precision))
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(workdir, ignore_errors=True)


def answer_token_log_probs(token_logp: torch.Tensor, batches) -> list[list[float]]:
    """Each row's log-probs at its answer positions (loss mask 1), in row order; `token_logp` is `[B, s]` over
    the rows of all `batches`."""
    loss_mask = torch.cat([batch.loss_mask for batch in batches])
    return [logp[mask.bool()].tolist() for logp, mask in zip(token_logp.cpu().double(), loss_mask)]


def write_per_token(path: str, index, parts: list[ScoredPart]) -> None:
    by_index = {i: t for p in parts for i, t in zip(p.index, p.token_logp)}
    write_jsonl(path, ({"index": int(i), "token_logp": by_index[int(i)]} for i in index))


def write_result(args, parts: list[ScoredPart], dataset, loaded_state, precision) -> None:
    index = [i for p in parts for i in p.index]
    order = np.argsort(index, kind="stable")
    index = np.asarray(index)[order]
    logp_sum = np.asarray([s for p in parts for s in p.logp_sum])[order]
    counts = np.asarray([c for p in parts for c in p.num_answer_tokens])[order]
    assert index.tolist() == list(range(len(dataset))), "every sample scored exactly once"
    broken = np.flatnonzero(~np.isfinite(logp_sum))
    if broken.size:
        raise ConfigError(f"{args.load}: {broken.size} of {len(index)} samples get a non-finite log-prob (first: sample "
                          f"{int(index[broken[0]])}); the checkpoint's weights are broken; nothing was written")
    meta = {
        "checkpoint": {"path": os.path.abspath(checkpoint.resolve(args.load)),
                       "checkpoint_id": loaded_state["checkpoint_id"], "iteration": loaded_state["iteration"]},
        "dataset": {"prefix": os.path.abspath(dataset.prefix) if args.data else args.jsonl,
                    "fingerprint": dataset.fingerprint},
        "precision": precision, "layout": {"tp": args.tp, "pp": args.pp, "cp": args.cp,
                                           "world": dist.get_world_size()},
        "num_samples": len(index),
    }
    paths.make_parent(args.out)
    paths.remove_stale_temporaries(args.out)
    write_cache(args.out, index, logp_sum, counts, meta)
    if args.per_token:
        paths.make_parent(args.per_token)
        write_per_token(args.per_token, index, parts)
    valid = counts > 0
    line = (f"scored {len(index)} samples: mean log-prob per answer token "
            f"{(logp_sum[valid] / counts[valid]).mean():.4f}; wrote {args.out} and {args.out}.meta.json")
    if args.reference:
        ref_sum = read_cache(args.reference)[1]
        m_theta = ((logp_sum - ref_sum.numpy())[valid] / counts[valid]).mean()
        line += f"\nm_theta against {args.reference}: {m_theta:+.6f}"
    print(line, flush=True)


def main(argv=None) -> int:
    return run_main(lambda: score(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
