"""The shape a training conversation must have: [system] user assistant (user assistant)*.

`repair` keeps what is usable of a messy conversation (the default); `validate` is the strict check that drops the
whole conversation instead (a source's `repair: false`).
"""
from __future__ import annotations

from training.data.errors import Drop

MERGE_SEPARATOR = "\n\n"  # between the texts of consecutive turns of one role


def validate(messages: list[dict]) -> None:
    """Raise Drop unless the conversation is [system] user assistant (user assistant)* with no empty turn."""
    if any(not m["content"] for m in messages):
        raise Drop("empty_turn")
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


def _merge(turns: list[dict]) -> tuple[list[dict], bool]:
    out: list[dict] = []
    for t in turns:
        if out and out[-1]["role"] == t["role"]:
            out[-1] = {"role": t["role"], "content": out[-1]["content"] + MERGE_SEPARATOR + t["content"]}
        else:
            out.append(dict(t))
    return out, len(out) < len(turns)


def repair(messages: list[dict]) -> tuple[list[dict], list[str]]:
    """The usable part of a conversation and the TRIM_REASONS applied to it (empty when it was kept whole).

    Empty turns go; system turns before the first user turn are the system prompt (merged when several), later
    ones go; assistant turns before the first user turn go (chunked dumps start mid-conversation); consecutive
    turns of one role are merged; a last user turn with no answer goes. Drop when no user -> assistant exchange
    is left (`empty_turn` when removing empty turns is what emptied it).
    """
    trims: list[str] = []
    turns = [m for m in messages if m["content"]]
    if len(turns) < len(messages):
        trims.append("empty_turn")
    first_user = next((i for i, t in enumerate(turns) if t["role"] == "user"), None)
    if first_user is None or not any(t["role"] == "assistant" for t in turns[first_user:]):
        raise Drop("empty_turn" if trims else "no_assistant_turn")
    head = [t for t in turns[:first_user] if t["role"] == "system"]
    if len(head) < first_user:
        trims.append("leading_assistant")
    body = [t for t in turns[first_user:] if t["role"] != "system"]
    if len(body) < len(turns) - first_user:
        trims.append("system_mid")
    head, merged_head = _merge(head)
    body, merged_body = _merge(body)
    if merged_head or merged_body:
        trims.append("merged_same_role")
    if body[-1]["role"] == "user":
        body.pop()
        trims.append("trailing_user")
    return head + body, trims
