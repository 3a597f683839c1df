"""Row shapes -> openai-style messages [{"role", "content"}], or Drop(reason); and the conversation shape check."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from training.data.errors import DataError, Drop

# Role names seen in public chat data sets -> the chat template's roles; anything else skips the row (unknown_role).
# human/gpt: ShareGPT, FineTome; chatgpt/bing/bard: ShareGPT dumps of those services; model: Gemma; prompter: OASST;
# developer: OpenAI's newer name for the system role.
ROLE_ALIASES = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "model": "assistant", "bot": "assistant",
    "system": "system", "developer": "system",
}
GUANACO_MARKER = re.compile(r"###\s*(Human|Assistant)\s*:")


@dataclass(frozen=True)
class RowFormat:
    """A data shape: how to recognise it from the columns of the first rows, and how one row becomes turns.

    `convert` returns [{"role", "content"}] with the roles already mapped; multi-turn formats may return empty
    texts (the caller repairs or validates the conversation), single-exchange ones raise Drop("empty_turn").
    """
    name: str
    detect: Callable[[set[str]], bool]
    convert: Callable[[dict], list[dict]] | None  # None: rows are not conversations (dialogue utterances)
    multi_turn: bool = True


def detect_format(rows: list[Any], name: str = "source") -> str:
    """Shape of a source from the columns of its first rows (the first matching entry of FORMAT_REGISTRY)."""
    keys: set[str] = set()
    for row in rows[:100]:
        if isinstance(row, dict):
            keys.update(k for k, v in row.items() if v is not None)
    for fmt in FORMAT_REGISTRY:
        if fmt.detect(keys):
            return fmt.name
    first = next((r for r in rows if isinstance(r, dict)), None)
    if first is None:
        seen = (f"none of its {len(rows)} rows could be parsed as a JSON object" if rows else "it has no rows")
    else:
        seen = f"its first row has the keys {sorted(first)}"
    raise DataError(f"cannot detect the format of {name}: {seen}; set format to one of {', '.join(FORMATS[1:])}")


def turn_text(value: Any, allow_empty: bool = False) -> str:
    """A turn's text, stripped; Drop for a missing / non-text value, and for an empty one unless allow_empty."""
    if value is None:
        raise Drop("missing_field")
    if isinstance(value, list):  # OpenAI content parts: [{"type": "text", "text": ...}]
        if not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
            raise Drop("bad_type")
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise Drop("bad_type")
    if not value.strip() and not allow_empty:
        raise Drop("empty_turn")
    return value.strip()


def _turns(value: Any) -> list:
    if isinstance(value, str):  # CSV cells hold nested lists as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise Drop("bad_type") from None
    if value is None:
        raise Drop("missing_field")
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise Drop("bad_type")
    if not value:
        raise Drop("no_assistant_turn")
    return value


def required_field(row: dict, key: str) -> Any:
    if row.get(key) is None:
        raise Drop("missing_field")
    return row[key]


def _role_turns(turns: list[dict], role_key: str, text_key: str) -> list[dict]:
    # Roles are checked after every text so that a row counts under one reason whatever the order of its turns.
    raw = [(required_field(t, role_key), turn_text(required_field(t, text_key), allow_empty=True)) for t in turns]
    out = []
    for role, content in raw:
        role = ROLE_ALIASES.get(str(role).strip().lower())
        if role is None:
            raise Drop("unknown_role")
        out.append({"role": role, "content": content})
    return out


def from_messages(row: dict) -> list[dict]:
    return _role_turns(_turns(required_field(row, "messages")), "role", "content")


def from_sharegpt(row: dict) -> list[dict]:
    turns = _turns(required_field(row, "conversations"))
    keys = ("from", "value") if any("from" in t for t in turns) else ("role", "content")
    return _role_turns(turns, *keys)


def from_alpaca(row: dict) -> list[dict]:
    instruction, output = turn_text(required_field(row, "instruction")), turn_text(required_field(row, "output"))
    extra = row.get("input")
    prompt = f"{instruction}\n\n{extra.strip()}" if isinstance(extra, str) and extra.strip() else instruction
    system = row.get("system")
    head = [{"role": "system", "content": system.strip()}] if isinstance(system, str) and system.strip() else []
    return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def from_openorca(row: dict) -> list[dict]:
    question, response = turn_text(required_field(row, "question")), turn_text(required_field(row, "response"))
    system = row.get("system_prompt")
    head = [{"role": "system", "content": system.strip()}] if isinstance(system, str) and system.strip() else []
    return head + [{"role": "user", "content": question}, {"role": "assistant", "content": response}]


def from_guanaco(row: dict) -> list[dict]:
    text = required_field(row, "text")
    if not isinstance(text, str):
        raise Drop("bad_type")
    parts = GUANACO_MARKER.split(text)  # [before, role, text, role, text, ...]
    if len(parts) < 3 or parts[0].strip():
        raise Drop("unparsable_text")
    return [{"role": "user" if who == "Human" else "assistant", "content": turn_text(body, allow_empty=True)}
            for who, body in zip(parts[1::2], parts[2::2])]


# Detection order matters: the first entry whose columns match wins. To add a format, write a converter above and
# add an entry here (FORMATS, detection, the CLI's --format choices and the config check follow).
FORMAT_REGISTRY: list[RowFormat] = [
    RowFormat("messages", lambda keys: "messages" in keys, from_messages),
    RowFormat("sharegpt", lambda keys: "conversations" in keys, from_sharegpt),
    RowFormat("dialogue", lambda keys: {"speaker", "text", "conversation_id"} <= keys, None),
    RowFormat("alpaca", lambda keys: {"instruction", "output"} <= keys, from_alpaca, multi_turn=False),
    RowFormat("openorca", lambda keys: {"question", "response"} <= keys, from_openorca, multi_turn=False),
    RowFormat("guanaco", lambda keys: "text" in keys, from_guanaco),
]
FORMAT_BY_NAME = {f.name: f for f in FORMAT_REGISTRY}
FORMATS = ("auto", *FORMAT_BY_NAME)  # every accepted `format` value; "auto" detects


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}] + messages
    return messages


def row_score(row: dict) -> float | None:
    try:
        value = float(row.get("score"))
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value

