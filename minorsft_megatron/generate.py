"""Greedy answers of a checkpoint to SFT prompts, and their exact-match accuracy against the records' answers.

    torchrun --nproc-per-node N -m minorsft_megatron.generate --load CKPT [--tp T] --jsonl FILE --tokenizer PATH
        [--chat-template NAME] --out FILE.jsonl [--max-new-tokens 64] [--batch-size 32]

For each record, the prompt is the conversation up to its last assistant turn, templated as in preprocessing
(with the template's generation prompt); the model then decodes greedily until EOS or the template's end-of-turn
marker. FILE.jsonl gets one line per record, in order: `{"index", "generated", "reference", "exact_match",
"generated_ids"}` (exact match: the stripped texts are equal). Tensor-parallel and data-parallel ranks split the
work; pipeline parallelism is not used here (tiny evaluation models). Prompts of the same token length are
decoded together, up to --batch-size at a time (no padding: a row sees only its own prompt, so batching changes
answers only through floating-point rounding). Each step recomputes the whole sequence (no KV cache): meant for
evaluation sets of short answers.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from minorsft_megatron import checkpoint, parallel, paths
from minorsft_megatron.cli import ArgumentParser, positive_int, run_main
from minorsft_megatron.config import ConfigError
from minorsft_megatron.data.formats import parse_record
from minorsft_megatron.data.records import RecordError
from minorsft_megatron.data.templates import prompt_ids, resolve_template
from minorsft_megatron.data.tokenizer import TokenizerError, load_tokenizer
from minorsft_megatron.device import setup_device
from minorsft_megatron.model import build_model, forward_kwargs, output_log_probs
from minorsft_megatron.reference_cache import write_jsonl
from minorsft_megatron.score import checkpoint_config
from minorsft_megatron.transformer_engine import RolePrecision

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")


def read_prompts(path: str, tokenizer, template) -> list[tuple[list[int], str]]:
    """(prompt ids, reference answer) per record; FILE:LINE errors for bad records."""
    prompts = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                messages = parse_record(line, tokenizer.special_tokens)
            except RecordError as err:
                raise ConfigError(f"{path}:{number}: {err}")
            if messages is None:
                continue
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompts.append((prompt_ids(messages[: last + 1], template, tokenizer), messages[last]["content"]))
    return prompts


def stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    for marker in END_OF_TURN:
        if marker in tokenizer.special_tokens:
            ids.update(tokenizer.encode(marker))
    return ids


def next_tokens(model, ids: torch.Tensor, log_probs) -> torch.Tensor:
    """Greedy next token of each row of `ids` [b, s]: full-vocabulary argmax over the TP shards of the last
    position's logits (`log_probs`, a logprobs.OutputLogProbs, makes them from what the model outputs; one
    all_gather over its TP group when TP > 1). Returns [b]."""
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    output = model(ids, positions, attention_mask=None, **forward_kwargs(model))
    logits = log_probs.last_position_logits(output)  # [b, V/tp]
    tp_group, vocab_size = log_probs.tp_group, log_probs.vocab_size
    if dist.get_world_size(tp_group) > 1:
        shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(shards, logits, group=tp_group)
        logits = torch.cat(shards, dim=-1)  # [b, V_padded]
    return logits[:, :vocab_size].argmax(dim=-1)


@torch.no_grad()
def greedy(model, prompts: list[list[int]], stops: set[int], max_new_tokens: int, log_probs,
           device) -> list[list[int]]:
    """Greedy continuations of prompts of one length, decoded together (no padding: each row attends only to its
    own tokens, as it would alone); a row leaves the batch at its stop token, which is not returned."""
    ids = torch.tensor(prompts, device=device)  # [b, s]
    rows = list(range(len(prompts)))  # the prompt each row of `ids` continues
    new: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        tokens = next_tokens(model, ids, log_probs)  # [b]
        going = [token not in stops for token in tokens.tolist()]
        for row, token, on in zip(rows, tokens.tolist(), going):
            if on:
                new[row].append(token)
        keep = torch.tensor(going, device=device)
        ids = torch.cat([ids[keep], tokens[keep, None]], dim=1)
        rows = [row for row, on in zip(rows, going) if on]
        if not rows:
            break
    return new


def same_length_batches(prompts: list[tuple[list[int], str]], indices, batch_size: int) -> list[list[int]]:
    """`indices` grouped by prompt length, in chunks of at most `batch_size`."""
    by_length: dict[int, list[int]] = {}
    for i in indices:
        by_length.setdefault(len(prompts[i][0]), []).append(i)
    return [group[k:k + batch_size] for _, group in sorted(by_length.items()) for k in range(0, len(group), batch_size)]


def check_fits(args, cfg, state: dict, tokenizer, prompts) -> None:
    """The checkpoint knows every token the tokenizer makes, and the longest prompt plus --max-new-tokens fits in
    its positions."""
    if tokenizer.vocab_size > state["vocab_size"]:
        raise ConfigError(f"--tokenizer {args.tokenizer}: has {tokenizer.vocab_size} tokens, more than the checkpoint "
                          f"{args.load}'s vocabulary of {state['vocab_size']}: use the tokenizer it was trained with")
    longest = max((len(ids) for ids, _ in prompts), default=0)
    limit = cfg.model.max_position_embeddings
    if longest + args.max_new_tokens > limit:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: the longest prompt ({longest} tokens) plus the "
                          f"answer would pass the model's {limit} positions (max_position_embeddings); use at most "
                          f"{max(limit - longest, 0)}")


def generate(args) -> None:
    from megatron.core import parallel_state

    parallel.check_layout(int(os.environ.get("WORLD_SIZE", "1")), args.tp)  # before reading anything
    paths.check_writable_file(args.out, "--out")
    paths.check_apart({"--out": args.out}, {"--jsonl": args.jsonl, "--tokenizer": args.tokenizer, "--load": args.load})
    cfg, state = checkpoint_config(args.load, args.tp, 1)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        template = resolve_template(args.chat_template, tokenizer)
    except TokenizerError as err:
        raise ConfigError(str(err))
    prompts = read_prompts(args.jsonl, tokenizer, template)
    check_fits(args, cfg, state, tokenizer, prompts)
    device = setup_device(cfg.device if cfg.device != "cuda" or torch.cuda.is_available() else None)
    pgs = parallel.initialize(device, tp=args.tp, seed=cfg.seed)
    model, _ = build_model(cfg, RolePrecision("fp32" if device.type == "cpu" else "bf16"), state["vocab_size"],
                           device, initialize=False, adapters=cfg.lora.rank > 0)
    checkpoint.load(args.load, model)
    model.eval()
    log_probs = output_log_probs(model, cfg.loss.logprob_chunk_size, state["vocab_size"], pgs.tp, False)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    mine = range(dp_rank, len(prompts), dp_size)
    stops = stop_ids(tokenizer)
    results = []
    for batch in same_length_batches(prompts, mine, args.batch_size):
        answers = greedy(model, [prompts[i][0] for i in batch], stops, args.max_new_tokens, log_probs, device)
        for i, new in zip(batch, answers):
            text = tokenizer.decode(new)
            results.append({"index": i, "generated": text, "reference": prompts[i][1],
                            "exact_match": text.strip() == prompts[i][1].strip(), "generated_ids": new})
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(results if parallel_state.get_tensor_model_parallel_rank() == 0 else [], gathered, dst=0)
    if dist.get_rank() == 0:
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
        paths.make_parent(args.out)
        paths.remove_stale_temporaries(args.out)
        write_jsonl(args.out, rows)
        accuracy = sum(r["exact_match"] for r in rows) / max(len(rows), 1)
        print(f"generated {len(rows)} answers: exact match {accuracy:.4f}; wrote {args.out}", flush=True)


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m minorsft_megatron.generate", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True)
    p.add_argument("--tp", type=positive_int, default=1)
    p.add_argument("--jsonl", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--chat-template", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=32, help="prompts of one token length decoded together")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_main(lambda: generate(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
