"""Row shapes -> openai-style messages [{"role", "content"}], or Drop(reason); and the conversation shape check."""
from __future__ import annotations

import json
import math
import re
from typing import Any, Callable

from training.data.errors import DataError, Drop

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}
MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
GUANACO_MARKER = re.compile(r"###\s*(Human|Assistant)\s*:")


def detect_format(rows: list[Any], name: str = "source") -> str:
    """Shape of a source from the columns of its first rows."""
    keys: set[str] = set()
    for row in rows[:100]:
        if isinstance(row, dict):
            keys.update(k for k, v in row.items() if v is not None)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"speaker", "text", "conversation_id"} <= keys:
        return "dialogue"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"question", "response"} <= keys:
        return "openorca"
    if "text" in keys:
        return "guanaco"
    raise DataError(f"cannot detect the format of {name} from its columns {sorted(keys)}; set format to one of "
                    f"{', '.join(FORMATS[1:])}")


def turn_text(value: Any) -> str:
    if value is None:
        raise Drop("missing_field")
    if isinstance(value, list):  # OpenAI content parts: [{"type": "text", "text": ...}]
        if not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
            raise Drop("bad_type")
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise Drop("bad_type")
    if not value.strip():
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


def _role_turns(turns: list[dict], role_key: str, text_key: str, aliases: dict[str, str]) -> list[dict]:
    # Roles are checked after every text so that a row counts under one reason whatever the order of its turns.
    raw = [(required_field(t, role_key), turn_text(required_field(t, text_key))) for t in turns]
    out = []
    for role, content in raw:
        role = aliases.get(str(role).strip().lower())
        if role is None:
            raise Drop("unknown_role")
        out.append({"role": role, "content": content})
    return out


def from_messages(row: dict) -> list[dict]:
    return _role_turns(_turns(required_field(row, "messages")), "role", "content", MESSAGE_ROLES)


def from_sharegpt(row: dict) -> list[dict]:
    turns = _turns(required_field(row, "conversations"))
    keys = ("from", "value") if any("from" in t for t in turns) else ("role", "content")
    return _role_turns(turns, *keys, SHAREGPT_ROLES)


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
    return [{"role": "user" if who == "Human" else "assistant", "content": turn_text(body)}
            for who, body in zip(parts[1::2], parts[2::2])]


ROW_FORMATS: dict[str, Callable[[dict], list[dict]]] = {
    "messages": from_messages, "sharegpt": from_sharegpt, "alpaca": from_alpaca,
    "openorca": from_openorca, "guanaco": from_guanaco,
}
# Every accepted `format` value: "auto" detects, "dialogue" is utterance rows (training.data.dialogue).
FORMATS = ("auto", *ROW_FORMATS, "dialogue")


def validate(messages: list[dict]) -> None:
    """Raise Drop unless the conversation is [system] user assistant (user assistant)*."""
    roles = [m["role"] for m in messages]
    if roles.count("system") > 1:
        raise Drop("multiple_system")
    if "system" in roles[1:]:
        raise Drop("system_not_first")
    chat = roles[1:] if roles and roles[0] == "system" else roles
    if "assistant" not in chat:
        raise Drop("no_assistant_turn")
    if chat[0] != "user":
        raise Drop("not_starting_with_user")
    if any(a == b for a, b in zip(chat, chat[1:])):
        raise Drop("not_alternating")
    if chat[-1] != "assistant":
        raise Drop("not_ending_in_assistant")


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

