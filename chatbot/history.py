"""Chat history: normalise what Gradio sends into openai-style messages, bound it in characters, and trim it to fit
the context."""
from __future__ import annotations

from typing import Any, Callable

# Marks replies written by the app rather than the model ("please type a message", "too long", ...).
# They and the message they answered never reach the model again.
NOTICE = "⚠️ "


def content_text(content: Any) -> str:
    """Text of a message's content in any shape Gradio 6 sends.

    The browser sends content blocks ([{"type": "text", "text": ...}]), the API sends plain strings,
    multimodal boxes send {"text": ..., "files": [...]}. Left as a list, llama.cpp's template would
    render the Python repr into the prompt. Files and other non-text blocks are dropped.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        if content.get("type", "text") == "text" and isinstance(content.get("text"), str):
            return content["text"]
        return ""
    if isinstance(content, list):
        return "".join(content_text(part) for part in content)
    return ""  # a tuple is Gradio's (file_path,) shorthand; components and files carry no text


def normalise(history: list[Any] | None) -> list[dict]:
    """Gradio history → [{"role": "user"|"assistant", "content": str}], empty and non-text turns dropped."""
    messages = []
    for item in history or []:
        role = item.get("role") if isinstance(item, dict) else getattr(item, "role", None)
        content = item.get("content") if isinstance(item, dict) else getattr(item, "content", None)
        # Tool-call / "thought" bubbles carry a metadata title: they are UI, not conversation.
        metadata = item.get("metadata") if isinstance(item, dict) else getattr(item, "metadata", None)
        if role not in ("user", "assistant") or (metadata and metadata.get("title")):
            continue
        text = content_text(content)
        if role == "assistant" and text.startswith(NOTICE):
            while messages and messages[-1]["role"] == "user":
                messages.pop()
            continue
        if not text.strip():
            continue
        # Consecutive messages of one role (e.g. text + file from a multimodal box) become one.
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


def keep_recent(history: list[dict], max_chars: int) -> list[dict]:
    """The newest whole turns of `history` (user message first) whose text is at most max_chars characters,
    counted without tokenising: the history limit applied before the model is asked for anything."""
    total, start = 0, len(history)
    for i in range(len(history) - 1, -1, -1):
        total += len(history[i]["content"])
        if total > max_chars:
            break
        if history[i]["role"] == "user":
            start = i
    return history[start:]


def build_messages(system_prompt: str, history: list[dict], message: str) -> list[dict]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    return system + history + [{"role": "user", "content": message}]


def trim(messages: list[dict], count_tokens: Callable[[list[dict]], int], n_ctx: int,
         max_new_tokens: int) -> tuple[list[dict], int] | None:
    """Drop the oldest turns until prompt + max_new_tokens fits in n_ctx.

    The system message (if first) and the newest message are always kept; whole turns go, so the
    history never starts with an orphan assistant reply. Returns (messages, prompt_tokens), or None
    when even the system prompt and the newest message alone do not fit.
    """
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body, newest = messages[len(head):-1], messages[-1:]
    # A turn starts at each user message; cutting only there keeps user/assistant alternation.
    starts = sorted({0} | {i for i, m in enumerate(body) if m["role"] == "user"}) + [len(body)]
    budget = n_ctx - max_new_tokens

    def candidate(k: int) -> list[dict]:
        return head + body[starts[k]:] + newest

    # Fewer turns never need more tokens, so binary-search the fewest dropped turns that fit:
    # O(log turns) tokenisations instead of one per turn.
    lo, hi = 0, len(starts) - 1
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        n = count_tokens(candidate(mid))
        if n <= budget:
            best, hi = (mid, n), mid - 1
        else:
            lo = mid + 1
    if best is None:
        return None
    return candidate(best[0]), best[1]
