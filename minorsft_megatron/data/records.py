"""SFT records: JSON text checked and parsed, text fields and special tokens checked. The lowest layer of data/:
it imports nothing of the package but errors.py (formats.py, which turns a record into chat messages, builds on
it).

Every problem raises RecordError with a message that the caller prefixes with the record's place (FILE:LINE, or
a row).
"""

from __future__ import annotations

import json

from minorsft_megatron.errors import UserError

ROLES = ("system", "user", "assistant")


class RecordError(UserError):
    """A record that cannot become a training sample; the message says what is wrong with it."""


def text_value(value, where: str) -> str:
    """`value` as training text: a non-blank string of valid Unicode; `where` names it in errors."""
    if not isinstance(value, str):
        raise RecordError(f"{where} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(f"{where} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON's \ud800 escapes decode to lone surrogates, which are not text
        raise RecordError(f"{where} is not valid Unicode (a lone surrogate, {value[err.start]!r}, at "
                          f"character {err.start})")
    return value


def _refuse_duplicate_keys(pairs: list) -> dict:
    """A JSON object, refusing a key given twice (json keeps the last silently: which answer was meant?)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise RecordError(f"the key '{key}' appears twice in one object")
        seen.add(key)
    return dict(pairs)


def parse_json_record(line: bytes) -> dict | None:
    """The JSON object of one record's text; None for a blank line. RecordError for invalid UTF-8, malformed
    JSON, a key given twice, or something other than an object."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError(f"invalid UTF-8 at byte {err.start}")
    if not text.strip():
        return None
    try:
        obj = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as err:
        raise RecordError(f"malformed JSON: {err.msg} at column {err.colno}")
    if not isinstance(obj, dict):
        raise RecordError(f"a record must be a JSON object, got {type(obj).__name__}")
    return obj


def check_special_tokens(messages: list[dict], special_tokens: frozenset[str]) -> list[dict]:
    """Refuse content holding one of the tokenizer's special tokens (it would be read as a chat marker)."""
    for message in messages:
        for token in special_tokens:
            if token in message["content"]:
                raise RecordError(f"{message['role']} content holds the special token {token!r}")
    return messages

