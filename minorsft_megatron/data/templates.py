"""Chat templates: a conversation -> token ids plus a per-token answer mask (1 on every assistant turn, except
one marked `"train": False`: context, as TRL's conversational prompt-completion prompts are).

A template is Jinja text (HF-style: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`), or
'none'. Built-ins: `chatml` (Qwen) and `llama3`; `auto` takes the template in a Hugging Face tokenizer's
config. Assistant spans are found by rendering prefixes of the conversation: turn i's answer is the text
between render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]), less whitespace the
template puts after it. The text is cut at those span boundaries and each piece is encoded on its own (no
BOS/EOS added; chat markers in the template text become their special-token ids), so decode(ids) gives
back the rendered text and each token is entirely prompt or entirely answer.

'none' writes [BOS if the tokenizer adds one by default] + encode(m.content) for each message in turn, with
EOS after each assistant message; the answer tokens are encode(assistant content) + [EOS]. For a
prompt/response record that is [BOS] + encode(prompt) + encode(response) + [EOS].
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from minorsft_megatron.data.records import RecordError
from minorsft_megatron.data.tokenizer import SFTTokenizer, TokenizerError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BuiltinTemplate:
    jinja: str
    special_tokens: tuple[str, ...]
    """Markers the tokenizer must hold as special tokens for this template to mean anything."""


BUILTIN_TEMPLATES = {
    "chatml": BuiltinTemplate(CHATML, ("<|im_start|>", "<|im_end|>")),
    "llama3": BuiltinTemplate(
        LLAMA3, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    ),
}
TEMPLATE_NAMES = ("auto", "none", *BUILTIN_TEMPLATES)


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    """'none', a built-in name, or 'auto' (the tokenizer's own)."""
    jinja: str | None
    """Template text; None for 'none'."""

    @property
    def sha256(self) -> str:
        return hashlib.sha256((self.jinja or "none").encode()).hexdigest()


def resolve_template(name: str | None, tokenizer: SFTTokenizer) -> ChatTemplate:
    """The template called `name` for `tokenizer`; None means 'auto' if the tokenizer has one, else 'none'.

    Raises TokenizerError when the tokenizer cannot serve it (no chat template for 'auto', a missing chat
    marker for a built-in, no EOS for 'none').
    """
    if name is None:
        name = "auto" if tokenizer.chat_template else "none"
    if name == "none":
        if tokenizer.eos_id is None:
            raise TokenizerError(f"{tokenizer.path}: --chat-template none needs an EOS token; the tokenizer has none")
        return ChatTemplate("none", None)
    if name == "auto":
        if not tokenizer.chat_template:
            raise TokenizerError(
                f"{tokenizer.path}: --chat-template auto needs a Hugging Face tokenizer with a chat_template; "
                f"use one of {', '.join(TEMPLATE_NAMES[1:])}"
            )
        return ChatTemplate("auto", tokenizer.chat_template)
    if name not in BUILTIN_TEMPLATES:
        raise TokenizerError(f"--chat-template {name!r} is not one of {', '.join(TEMPLATE_NAMES)}")
    missing = [t for t in BUILTIN_TEMPLATES[name].special_tokens if t not in tokenizer.special_tokens]
    if missing:
        raise TokenizerError(
            f"{tokenizer.path}: --chat-template {name} needs the special token(s) {', '.join(missing)}, "
            "which this tokenizer does not have"
        )
    return ChatTemplate(name, BUILTIN_TEMPLATES[name].jinja)


@functools.lru_cache(maxsize=8)
def _compile(jinja: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(jinja)


def render(template: ChatTemplate, tokenizer: SFTTokenizer, messages, add_generation_prompt=False) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return _compile(template.jinja).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
        )
    except TemplateError as err:
        raise RecordError(f"chat template {template.name!r} failed: {err}")


def is_trained(message: dict) -> bool:
    """An assistant turn not marked `"train": False` (context a record format says is not an answer)."""
    return message["role"] == "assistant" and message.get("train", True)


def answer_spans(template: ChatTemplate, tokenizer: SFTTokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each trained assistant turn in it."""
    text = render(template, tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if not is_trained(message):
            continue
        before = render(template, tokenizer, messages[:i], add_generation_prompt=True)
        through = render(template, tokenizer, messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise RecordError(
                f"chat template {template.name!r} renders turn {i} differently once later turns follow, "
                "so its answer cannot be located; use a built-in --chat-template"
            )
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    return text, spans


def _pieces_from_spans(text: str, spans) -> list[tuple[str, bool]]:
    pieces, at = [], 0
    for start, end in spans:
        pieces += [(text[at:start], False), (text[start:end], True)]
        at = end
    pieces.append((text[at:], False))
    return [(piece, trained) for piece, trained in pieces if piece]


def tokenize_conversation(messages, template: ChatTemplate, tokenizer: SFTTokenizer):
    """Token ids `[n]` int64 and answer mask `[n]` uint8 (1 where the token belongs to an assistant turn)."""
    if template.jinja is None:
        ids, mask = ([tokenizer.bos_id], [0]) if tokenizer.adds_bos else ([], [])
        for message in messages:
            answer = message["role"] == "assistant"
            piece = tokenizer.encode(message["content"]) + ([tokenizer.eos_id] if answer else [])
            ids += piece
            mask += [int(is_trained(message))] * len(piece)
    else:
        text, spans = answer_spans(template, tokenizer, messages)
        ids, mask = [], []
        for piece, trained in _pieces_from_spans(text, spans):
            piece_ids = tokenizer.encode(piece)
            ids += piece_ids
            mask += [int(trained)] * len(piece_ids)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def prompt_ids(messages, template: ChatTemplate, tokenizer: SFTTokenizer) -> list[int]:
    """Token ids of a conversation up to the start of its last (assistant) turn's answer, cut exactly as
    `tokenize_conversation` cuts it for training: what a model is given to produce that answer."""
    if messages[-1]["role"] != "assistant":
        raise RecordError("the conversation does not end with an assistant turn")
    if template.jinja is None:
        ids, _ = tokenize_conversation(messages[:-1], template, tokenizer)
        return ids.tolist()
    text, spans = answer_spans(template, tokenizer, messages)
    start = spans[-1][0]
    return [i for piece, _ in _pieces_from_spans(text[:start], spans[:-1]) for i in tokenizer.encode(piece)]
