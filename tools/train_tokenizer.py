#!/usr/bin/env python
"""Train the tiny SentencePiece tokenizer bundled in examples/data/ from bundled text.

    python tools/train_tokenizer.py [--input examples/data/tokenizer_corpus.txt]
                                    [--out examples/data/tokenizer.model] [--vocab-size 1024]

A BPE model with byte fallback (any UTF-8 text encodes, and decodes back exactly), identity normalisation,
no dummy prefix and no whitespace folding, so that decode(encode(text)) == text. The special tokens of the
built-in chat templates (chatml, llama3) are user-defined pieces, so each is one token. Ids 0-3 are
<unk>, <s> (BOS), </s> (EOS) and <pad>. Training is single-threaded on unshuffled input: the same input
gives the same model bytes.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import sentencepiece as spm

CHAT_SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>",                                            # chatml (Qwen)
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # llama3
]


EXACT_DECODE = dict(
    character_coverage=1.0,
    normalization_rule_name="identity",
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    unk_id=0, bos_id=1, eos_id=2, pad_id=3,
    num_threads=1,
    shuffle_input_sentence=False,
    minloglevel=2,
)
"""Options every tokenizer trained here shares: decode(encode(text)) == text, ids 0-3 as above, same bytes per input."""


def train_sentencepiece(lines: list[str], out: str, **options) -> None:
    """Train a SentencePiece model from memory (no file paths end up inside it) and write it to `out` atomically."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **EXACT_DECODE, **options)
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, out)


def main():
    here = os.path.join(os.path.dirname(__file__), "..", "examples", "data")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=os.path.join(here, "tokenizer_corpus.txt"))
    parser.add_argument("--out", default=os.path.join(here, "tokenizer.model"))
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args()
    if not os.path.isfile(args.input):
        sys.exit(f"{args.input}: no such file")
    with open(args.input, encoding="utf-8") as f:
        lines = f.read().splitlines()
    train_sentencepiece(lines, args.out, model_type="bpe", vocab_size=args.vocab_size, byte_fallback=True,
                        split_digits=True, user_defined_symbols=CHAT_SPECIAL_TOKENS)
    print(f"wrote {os.path.normpath(args.out)} ({args.vocab_size} pieces)")


if __name__ == "__main__":
    main()
