#!/usr/bin/env python
"""Write the bundled example SFT data: small, deterministic, and learnable by a tiny model on a CPU.

    python tools/make_example_data.py [--out-dir examples/data]

Writes (same bytes on every run):
  sft_train.jsonl        1200 records: prompt/response records and multi-turn `messages` records
  sft_eval.jsonl          100 held-out records of the same tasks
  tokenizer_corpus.txt    the text the tiny SentencePiece tokenizer is trained on (tools/train_tokenizer.py)

Tasks: two-number addition, reversing a word, upper-casing a word, capitals of countries, and two-turn
conversations (an addition, then doubling its result). A third of the records carry a system prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import random

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Austria": "Vienna", "Poland": "Warsaw", "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Peru": "Lima", "Chile": "Santiago",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Cuba": "Havana", "Russia": "Moscow", "Turkey": "Ankara",
}
WORDS = (
    "apple river stone cloud bread green house light music paper table water winter garden silver "
    "planet pencil orange window yellow forest candle mirror rocket castle dragon"
).split()
SYSTEMS = ["You are a helpful assistant.", "Answer briefly.", "You are a careful tutor."]
PROSE = """\
Supervised fine-tuning adapts a pre-trained language model to follow instructions.
The model reads a prompt and learns to write the response, one token after another.
Only the answer tokens are trained on; the prompt is context and is masked out of the loss.
A frozen reference model scores the same answers, and the difference of the two log-probabilities
says how far the fine-tuned model has moved from where it started.
"""


def addition(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} plus {b}?", f"{a} + {b} = {a + b}."


def reverse(rng):
    word = rng.choice(WORDS)
    return f"Reverse the letters of the word '{word}'.", f"'{word}' reversed is '{word[::-1]}'."


def upper(rng):
    word = rng.choice(WORDS)
    return f"Write the word '{word}' in capital letters.", word.upper()


def capital(rng):
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


def two_turns(rng):
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
        {"role": "user", "content": "And twice that?"},
        {"role": "assistant", "content": f"2 * {a + b} = {2 * (a + b)}."},
    ]


def record(rng):
    """One SFT record: a prompt/response pair, or a `messages` conversation; some with a system prompt."""
    system = rng.choice(SYSTEMS) if rng.random() < 1 / 3 else None
    if rng.random() < 0.2:
        messages = two_turns(rng)
        return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}
    prompt, response = rng.choice([addition, reverse, upper, capital])(rng)
    return {"prompt": prompt, "response": response} | ({"system": system} if system else {})


def record_text(rec):
    if "messages" in rec:
        return [m["content"] for m in rec["messages"]]
    return [rec.get("system"), rec["prompt"], rec["response"]]


def write(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "examples", "data"))
    args = parser.parse_args()
    rng = random.Random(1234)
    train = [record(rng) for _ in range(1200)]
    evaluation = [record(rng) for _ in range(100)]
    os.makedirs(args.out_dir, exist_ok=True)
    for name, records in (("sft_train.jsonl", train), ("sft_eval.jsonl", evaluation)):
        write(os.path.join(args.out_dir, name), "".join(json.dumps(r) + "\n" for r in records))
    lines = [t for r in train for t in record_text(r) if t]
    write(os.path.join(args.out_dir, "tokenizer_corpus.txt"), PROSE + "\n".join(lines) + "\n")
    print(f"wrote {len(train)} train and {len(evaluation)} eval records to {os.path.normpath(args.out_dir)}")


if __name__ == "__main__":
    main()
