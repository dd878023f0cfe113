"""The synthetic skills of the replication study, written deterministically from one seed.

Words are 3-6 letters over the alphabet a-j. Task A (what the base model is pre-trained on) is four skills,
each a prompt/response record whose prompt names the skill and ends with " =":

    copy bdca =  ->  bdca        rev bdca =   ->  acdb
    sort bdca =  ->  abcd        next bdca =  ->  cedb   (each letter to the next one, j wraps to a)

Task B (the new skill, the SFT set): `back bdca =` -> `jbca`, the word reversed, then each letter moved to the
previous one (a wraps to j). It reuses the base model's knowledge of the letters and of reversing, but the
keyword and the backward shift are new.

The tokenizer is a character-level SentencePiece model trained from the corpus itself, so every letter is one
token and an answer of k letters is k + 1 answer tokens (with EOS).
"""

from __future__ import annotations

import os
import random
import sys

ALPHABET = "abcdefghij"
MIN_LEN, MAX_LEN = 3, 6


def shift(word: str, by: int) -> str:
    return "".join(ALPHABET[(ALPHABET.index(c) + by) % len(ALPHABET)] for c in word)


SKILLS_A = {
    "copy": lambda w: w,
    "rev": lambda w: w[::-1],
    "sort": lambda w: "".join(sorted(w)),
    "next": lambda w: shift(w, 1),
}
SKILL_B = ("back", lambda w: shift(w[::-1], -1))


def random_word(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def record(skill: str, fn, word: str) -> dict:
    return {"prompt": f"{skill} {word} =", "response": fn(word)}


def split_words(rng: random.Random, sizes: dict[str, int]) -> dict[str, list[str]]:
    """Disjoint sets of distinct words, one per split: held-out words are never seen in training."""
    total = sum(sizes.values())
    words, seen = [], set()
    while len(words) < total:
        w = random_word(rng)
        if w not in seen:
            seen.add(w)
            words.append(w)
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = words[start:start + n]
        start += n
    return out


def corpus(seed: int, a_train: int, a_test: int, b_train: int, b_dev: int, b_test: int) -> dict[str, list[dict]]:
    """The study's splits: task A train/test (all four skills, interleaved) and task B train/dev/test."""
    rng = random.Random(seed)
    per_skill_train, per_skill_test = a_train // len(SKILLS_A), a_test // len(SKILLS_A)
    splits = {"a_train": [], "a_test": []}
    for skill, fn in SKILLS_A.items():
        words = split_words(rng, {"train": per_skill_train, "test": per_skill_test})
        splits["a_train"] += [record(skill, fn, w) for w in words["train"]]
        splits["a_test"] += [record(skill, fn, w) for w in words["test"]]
    rng.shuffle(splits["a_train"])
    rng.shuffle(splits["a_test"])
    words = split_words(rng, {"train": b_train, "dev": b_dev, "test": b_test})
    for name, ws in words.items():
        splits[f"b_{name}"] = [record(SKILL_B[0], SKILL_B[1], w) for w in ws]
    return splits


def train_tokenizer(texts: list[str], path: str) -> None:
    """A character-level SentencePiece model of `texts` (ids 0-3: unk, BOS, EOS, pad), written atomically."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
    from train_tokenizer import train_sentencepiece  # tools/train_tokenizer.py

    train_sentencepiece(texts, path, model_type="char", vocab_size=len(set("".join(texts))) + 4)


def write_splits(splits: dict[str, list[dict]], out_dir: str) -> dict[str, str]:
    """Each split as out_dir/NAME.jsonl, written atomically; returns {name: path}."""
    from minorsft_megatron.reference_cache import write_jsonl

    paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in splits}
    for name, rows in splits.items():
        write_jsonl(paths[name], rows)
    return paths
