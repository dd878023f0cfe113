"""Greedy generation: prompts cut exactly as training cuts them, and the same tokens as transformers' greedy search."""

import json
import os
import subprocess
import sys

import pytest
import torch

from minorsft_megatron.data.templates import prompt_ids, resolve_template, tokenize_conversation
from minorsft_megatron.data.tokenizer import load_tokenizer
from tests.convert_workers import hf_config
from tests.distributed import spawn
from tests.tokenizers_for_tests import DATA, REPO, SENTENCEPIECE_MODEL

CONVERSATION = [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."}, {"role": "user", "content": "Twice?"},
    {"role": "assistant", "content": "10."},
]


@pytest.mark.parametrize("name", ["chatml", "llama3", "none"])
def test_prompt_is_the_training_sample_before_its_last_answer(name):
    tok = load_tokenizer(SENTENCEPIECE_MODEL)
    template = resolve_template(name, tok)
    ids, mask = tokenize_conversation(CONVERSATION, template, tok)
    starts = [i for i in range(len(mask)) if mask[i] == 1 and (i == 0 or mask[i - 1] == 0)]
    assert prompt_ids(CONVERSATION, template, tok) == ids[: starts[-1]].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_greedy_tokens_match_transformers(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from minorsft_megatron.generate import parse_args, read_prompts, stop_ids

    config = hf_config(family)
    config.vocab_size = 1024  # the bundled tokenizer's
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3) if param.dim() > 1 else param.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "hf")
    subprocess.run([sys.executable, "tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", str(tmp_path / "hf"),
                    "--out", str(tmp_path / "mg"), "--dtype", "fp32"], check=True, cwd=REPO, capture_output=True)
    lines = open(os.path.join(DATA, "sft_eval.jsonl")).readlines()
    tok = load_tokenizer(SENTENCEPIECE_MODEL)
    chatml = resolve_template("chatml", tok)
    lengths = [len(p) for p, _ in read_prompts(os.path.join(DATA, "sft_eval.jsonl"), tok, chatml)]
    shared = max(set(lengths), key=lengths.count)  # prompts of one length are decoded together: 3 here, in 2 batches
    same_length = [line for line, n in zip(lines, lengths) if n == shared][:3]
    assert len(same_length) == 3
    records = tmp_path / "eval.jsonl"
    records.write_text("".join(lines[:4] + same_length))
    out = tmp_path / "answers.jsonl"
    argv = ["--load", str(tmp_path / "mg"), "--tp", "2", "--jsonl", str(records), "--tokenizer",
            SENTENCEPIECE_MODEL, "--chat-template", "chatml", "--out", str(out), "--max-new-tokens", "6",
            "--batch-size", "2"]
    from minorsft_megatron.generate import generate

    spawn(2, generate, parse_args(argv), out_dir=tmp_path / "job", timeout=300)
    rows = [json.loads(line) for line in open(out)]
    prompts = read_prompts(str(records), tok, resolve_template("chatml", tok))
    stops = sorted(stop_ids(tok))
    assert [r["index"] for r in rows] == list(range(7))
    for row, (prompt, reference) in zip(rows, prompts):
        with torch.no_grad():
            full = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=stops,
                                  pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        expected = [t for t in full[0, len(prompt):].tolist()]
        expected = expected[: next((i for i, t in enumerate(expected) if t in stops), len(expected))]
        assert row["generated_ids"] == expected
        assert row["reference"] == reference and row["exact_match"] == (row["generated"].strip() == reference.strip())
    assert sum(len(r["generated_ids"]) for r in rows) > 0
