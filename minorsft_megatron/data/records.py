"""SFT records: one JSON object per line, checked and turned into a list of chat messages.

Two shapes are accepted:
  {"prompt": str, "response": str, "system": str?}      -> [system?, user, assistant]
  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
Other top-level keys (an "id", say) are ignored. Every problem raises RecordError with a message that the
caller prefixes with FILE:LINE.
"""

from __future__ import annotations

import json

from minorsft_megatron.errors import UserError

ROLES = ("system", "user", "assistant")


class RecordError(UserError):
    """A record that cannot become a training sample; the message says what is wrong with it."""


def _text_field(obj: dict, key: str, where: str, required: bool = True) -> str | None:
    if key not in obj:
        if required:
            raise RecordError(f"{where}'{key}' is missing")
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(f"{where}'{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(f"{where}'{key}' is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON's \ud800 escapes decode to lone surrogates, which are not text
        raise RecordError(f"{where}'{key}' is not valid Unicode (a lone surrogate, {value[err.start]!r}, at "
                          f"character {err.start})")
    return value


def _prompt_response(obj: dict) -> list[dict]:
    system = _text_field(obj, "system", "", required=False)
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [
        {"role": "user", "content": _text_field(obj, "prompt", "")},
        {"role": "assistant", "content": _text_field(obj, "response", "")},
    ]


def _conversation(obj: dict) -> list[dict]:
    turns = obj["messages"]
    if not isinstance(turns, list):
        raise RecordError(f"'messages' must be a list, got {type(turns).__name__}")
    if not turns:
        raise RecordError("'messages' is empty")
    messages = []
    for i, turn in enumerate(turns):
        where = f"messages[{i}]."
        if not isinstance(turn, dict):
            raise RecordError(f"messages[{i}] must be an object, got {type(turn).__name__}")
        role = turn.get("role")
        if role not in ROLES:
            shown = "missing" if "role" not in turn else repr(role)
            raise RecordError(f"{where}role is {shown}, expected one of {', '.join(ROLES)}")
        messages.append({"role": role, "content": _text_field(turn, "content", where)})
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("the conversation has no assistant turn")
    return messages


def _refuse_duplicate_keys(pairs: list) -> dict:
    """A JSON object, refusing a key given twice (json keeps the last silently: which answer was meant?)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise RecordError(f"the key '{key}' appears twice in one object")
        seen.add(key)
    return dict(pairs)


def parse_record(line: bytes, special_tokens: frozenset[str] = frozenset()) -> list[dict] | None:
    """The chat messages of one JSONL line; None for a blank line.

    Raises RecordError for invalid UTF-8, malformed JSON, a wrong shape, missing/empty/mistyped fields, unknown
    roles, a conversation without an assistant turn, or content holding one of `special_tokens` (which would
    otherwise be read as a chat marker).
    """
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
    has_pair, has_messages = ("prompt" in obj or "response" in obj), "messages" in obj
    if has_pair == has_messages:
        raise RecordError("a record needs either 'prompt' and 'response' or 'messages' (exactly one of them)")
    messages = _conversation(obj) if has_messages else _prompt_response(obj)
    for i, message in enumerate(messages):
        for token in special_tokens:
            if token in message["content"]:
                raise RecordError(f"{message['role']} content holds the special token {token!r}")
    return messages
