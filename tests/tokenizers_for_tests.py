"""Tiny tokenizers of each library megatron-core supports, built from the bundled corpus (nothing downloaded)."""

import base64
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "examples", "data")
SENTENCEPIECE_MODEL = os.path.join(DATA, "tokenizer.model")
CORPUS = os.path.join(DATA, "tokenizer_corpus.txt")
CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def huggingface_dir(path: str, adds_bos: bool, chat_template: str | None = CHATML_JINJA) -> str:
    """A byte-level BPE Hugging Face tokenizer directory; with `adds_bos` its default encoding starts with <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    with open(CORPUS, encoding="utf-8") as f:
        tok.train_from_iterator(f.read().splitlines(), trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(path)
    return path


def tiktoken_vocab(path: str) -> str:
    """A tiktoken vocabulary in megatron-core's JSON format: the 256 bytes plus a few merges."""
    merges = [b"th", b"he", b"the", b"in", b" t", b"is", b" is", b"an", b"er"]
    pieces = [bytes([i]) for i in range(256)] + merges
    vocab = [
        {"rank": i, "token_bytes": base64.b64encode(p).decode(), "token_str": p.decode("utf-8", "replace")}
        for i, p in enumerate(pieces)
    ]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    return path
