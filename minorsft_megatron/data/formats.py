"""SFT record formats: the shapes the ecosystem stores conversations in, each turned into the same chat messages.

A record (a JSON object, or a row of a Parquet file or Hugging Face dataset) becomes a list of messages
`{"role": "system" | "user" | "assistant", "content": str}`; an assistant message may carry `"train": False`
(a turn the model sees but is not trained on: TRL's prompt-completion trains the completion only). Every
other assistant turn is an answer. The formats, by the keys that identify them:

  messages           {"messages": [{"role", "content"}, ...]}              OpenAI chat / TRL conversational, and
                     content may be a list of parts [{"type": "text", "text": ...}, ...] (text parts joined with
                     "\\n"; any other part is refused, naming it)
  sharegpt           {"conversations": [{"from", "value"}, ...], "system"?}  ShareGPT (LLaMA-Factory, FastChat):
                     from = human | user, gpt | assistant, system
  alpaca             {"instruction", "input"?, "output", "system"?, "history"?}  Alpaca, joined as LLaMA-Factory
                     does: the user turn is instruction + "\\n" + input (input left out when empty), after the
                     [user, assistant] pairs of `history`; the system prompt from `system`
  prompt_completion  {"prompt", "completion"}                             TRL prompt-completion: two strings (a
                     user and an assistant turn), or two lists of messages (the prompt's own assistant turns are
                     not trained)
  prompt_response    {"prompt", "response", "system"?}                     this package's own single turn

Every problem raises records.RecordError with a message the caller prefixes with the record's place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from minorsft_megatron.data.records import ROLES, RecordError, check_special_tokens, parse_json_record, text_value


@dataclass(frozen=True)
class RecordFormat:
    name: str
    keys: tuple[str, ...]
    """Keys whose presence identifies a record of this format."""
    to_messages: Callable[[dict], list[dict]]
    """The record's chat messages; RecordError naming the field for a record that does not fit."""


def _required(obj: dict, key: str, where: str = ""):
    if key not in obj:
        raise RecordError(f"{where}'{key}' is missing")
    return obj[key]


def _optional_text(obj: dict, key: str) -> str | None:
    """A string field that may be absent, null or empty (LLaMA-Factory's optional columns)."""
    value = obj.get(key)
    if value is None or value == "":
        return None
    return text_value(value, f"'{key}'")


def _system_message(obj: dict) -> list[dict]:
    """[the system turn] from an optional top-level `system`, or []."""
    system = _optional_text(obj, "system")
    return [{"role": "system", "content": system}] if system is not None else []


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise RecordError(f"{where} must be a list, got {type(value).__name__}")
    if not value:
        raise RecordError(f"{where} is empty")
    return value


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise RecordError(f"{where} must be an object, got {type(value).__name__}")
    return value


def _content(value, where: str) -> str:
    """A message's content: a string, or a list of text parts (OpenAI's content parts) joined with newlines."""
    if not isinstance(value, list):
        return text_value(value, where)
    texts = []
    for i, part in enumerate(_list(value, where)):
        part = _object(part, f"{where}[{i}]")
        if part.get("type") != "text":
            raise RecordError(f"{where}[{i}]: a {part.get('type', 'untyped')!r} part; only text parts can be trained "
                              "on")
        texts.append(text_value(_required(part, "text", f"{where}[{i}]."), f"{where}[{i}].text"))
    return "\n".join(texts)


def _role_messages(turns, where: str, roles=ROLES) -> list[dict]:
    messages = []
    for i, turn in enumerate(_list(turns, f"'{where}'")):
        turn = _object(turn, f"{where}[{i}]")
        role = turn.get("role")
        if role not in roles:
            shown = "missing" if "role" not in turn else repr(role)
            raise RecordError(f"{where}[{i}].role is {shown}, expected one of {', '.join(roles)}")
        if turn.get("tool_calls"):
            raise RecordError(f"{where}[{i}]: tool calls are not supported")
        message = {"role": role, "content": _content(_required(turn, "content", f"{where}[{i}]."),
                                                     f"{where}[{i}].content")}
        messages.append(_with_weight(message, turn, f"{where}[{i}]"))
    return messages


def _with_weight(message: dict, turn: dict, where: str) -> dict:
    """OpenAI's fine-tuning `weight` on an assistant turn: 0 is context (not trained), 1 an answer."""
    weight = turn.get("weight")
    if weight is None:
        return message
    if message["role"] != "assistant":
        raise RecordError(f"{where}.weight: only assistant turns have a weight")
    if weight not in (0, 1) or isinstance(weight, bool):
        raise RecordError(f"{where}.weight must be 0 or 1, got {weight!r}")
    return message if weight == 1 else dict(message, train=False)


def _with_answer(messages: list[dict]) -> list[dict]:
    if not any(m["role"] == "assistant" and m.get("train", True) for m in messages):
        raise RecordError("the conversation has no assistant turn")
    return messages


def openai_messages(obj: dict) -> list[dict]:
    return _with_answer(_role_messages(_required(obj, "messages"), "messages"))


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def sharegpt(obj: dict) -> list[dict]:
    messages = _system_message(obj)
    for i, turn in enumerate(_list(_required(obj, "conversations"), "'conversations'")):
        turn = _object(turn, f"conversations[{i}]")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            shown = "missing" if "from" not in turn else repr(speaker)
            raise RecordError(f"conversations[{i}].from is {shown}, expected one of {', '.join(SHAREGPT_ROLES)}")
        value = _required(turn, "value", f"conversations[{i}].")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": text_value(value, f"conversations[{i}].value")})
    return _with_answer(messages)


def alpaca(obj: dict) -> list[dict]:
    messages = _system_message(obj)
    for i, pair in enumerate(obj.get("history") or []):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise RecordError(f"history[{i}] must be a [instruction, response] pair")
        messages += [{"role": "user", "content": text_value(pair[0], f"history[{i}][0]")},
                     {"role": "assistant", "content": text_value(pair[1], f"history[{i}][1]")}]
    instruction = text_value(_required(obj, "instruction"), "'instruction'")
    extra = _optional_text(obj, "input")
    user = instruction if extra is None else f"{instruction}\n{extra}"
    answer = text_value(_required(obj, "output"), "'output'")
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def prompt_completion(obj: dict) -> list[dict]:
    prompt, completion = _required(obj, "prompt"), _required(obj, "completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": text_value(prompt, "'prompt'")},
                {"role": "assistant", "content": text_value(completion, "'completion'")}]
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise RecordError("'prompt' and 'completion' must be two strings or two lists of messages, got "
                          f"{type(prompt).__name__} and {type(completion).__name__}")
    context = [dict(m, train=False) if m["role"] == "assistant" else m for m in _role_messages(prompt, "prompt")]
    answers = _role_messages(completion, "completion", roles=("assistant",))
    return context + answers


def prompt_response(obj: dict) -> list[dict]:
    messages = _system_message(obj)
    return messages + [{"role": "user", "content": text_value(_required(obj, "prompt"), "'prompt'")},
                       {"role": "assistant", "content": text_value(_required(obj, "response"), "'response'")}]


FORMATS = {f.name: f for f in (
    RecordFormat("messages", ("messages",), openai_messages),
    RecordFormat("sharegpt", ("conversations",), sharegpt),
    RecordFormat("alpaca", ("instruction", "output"), alpaca),
    RecordFormat("prompt_completion", ("prompt", "completion"), prompt_completion),
    RecordFormat("prompt_response", ("prompt", "response"), prompt_response),
)}
"""Every record format by name, in the order detection lists them."""


def detect_format(obj: dict) -> str:
    """The one format whose identifying keys the record holds."""
    found = [f.name for f in FORMATS.values() if all(key in obj for key in f.keys)]
    if len(found) == 1:
        return found[0]
    known = "; ".join(f"{f.name} ({' + '.join(f.keys)})" for f in FORMATS.values())
    if not found:
        raise RecordError(f"no known record format in its keys ({', '.join(sorted(obj)) or 'none'}); known: {known}")
    raise RecordError(f"holds the keys of several formats ({', '.join(found)}): choose one with --format, or the "
                      "columns with --columns")


OPTIONAL_KEYS = ("system", "input", "history")


def select_columns(obj: dict, columns: dict[str, str]) -> dict:
    """The record with `columns` (format key -> the record's column) renamed to the format's keys, replacing
    what those keys held; an optional key's column may be absent (a null in Parquet or Arrow)."""
    if not columns:
        return obj
    columns = {key: column for key, column in columns.items() if column in obj or key not in OPTIONAL_KEYS}
    missing = [column for column in columns.values() if column not in obj]
    if missing:
        raise RecordError(f"the column(s) {', '.join(missing)} named by --columns are missing")
    renamed = {key: obj[column] for key, column in columns.items()}
    return {**{k: v for k, v in obj.items() if k not in columns and k not in columns.values()}, **renamed}


def matching_formats(obj: dict) -> list[str]:
    return [f.name for f in FORMATS.values() if all(key in obj for key in f.keys)]


def record_messages(obj: dict, fallback: str | None = None, columns: dict[str, str] | None = None,
                    special_tokens: frozenset[str] = frozenset(), forced: bool = False) -> tuple[str, list[dict]]:
    """(format, chat messages) of a record, null fields dropped (as Parquet and Arrow rows come) and its columns
    selected first. Its keys decide the format; a record
    holding only part of `fallback`'s keys (its file's format) is read as that, naming what is missing.
    `forced`: read it as `fallback` whatever keys it holds."""
    obj = select_columns({key: value for key, value in obj.items() if value is not None}, columns or {})
    name = fallback
    if not forced:
        found = matching_formats(obj)
        partial = fallback is not None and any(key in obj for key in FORMATS[fallback].keys)
        if len(found) > 1 or (not found and not partial):
            detect_format(obj)  # raises, naming the formats or the keys
        name = found[0] if found else fallback
    return name, check_special_tokens(FORMATS[name].to_messages(obj), special_tokens)


def parse_record(line: bytes, special_tokens: frozenset[str] = frozenset()) -> list[dict] | None:
    """The chat messages of one JSONL line in any known format (detected from its keys); None for a blank line."""
    obj = parse_json_record(line)
    return None if obj is None else record_messages(obj, special_tokens=special_tokens)[1]
