"""One reply, from a request to streamed text, shared by the chat and the Arena: the checks that run before a
request costs anything (the message, the settings' numbers), the cache key of a visitor's conversation, and the
stream itself.

The backend decodes in a producer thread while the caller's generator drains whatever text has arrived, so decoding
never waits for the UI and updates go out at most every STREAM_INTERVAL seconds. Closing the generator (Gradio's stop
button, a client gone) sets the cancel event; the backend returns at the next token and releases the model.
"""
from __future__ import annotations

import contextvars
import hashlib
import hmac
import math
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from typing import Any, Iterator

from chatbot.backends.base import Backend, GenerationParams
from chatbot.history import NOTICE
from chatbot.settings import Settings
from chatbot.timing import ReplyClock

STREAM_INTERVAL = 0.05  # seconds between UI updates while streaming
KEY_SECRET = os.urandom(32)  # this process's secret for conversation_key


def notice(text: str) -> str:
    return NOTICE + text


def format_stats(clock: ReplyClock, finish: str | None, dropped: int, over_limit: int = 0) -> str:
    """One unobtrusive line under the chat: tokens, decode speed, time to first token, why it ended."""
    if clock.ttft is None:
        return ""
    tps = clock.decode_tps
    speed = f"{tps:.1f} tokens/s" if tps is not None else "– tokens/s"
    parts = [f"{clock.tokens} tokens", speed, f"first token {clock.ttft:.2f} s"]
    if finish == "length":
        parts.append("stopped at max new tokens")
    elif finish == "cancelled":
        parts.append("stopped")
    if dropped:
        parts.append(f"{dropped} oldest messages left out to fit the context")
    if over_limit:
        parts.append(f"{over_limit} oldest messages over CHATBOT_MAX_HISTORY_CHARS left out")
    return " · ".join(parts)


def stream_reply(backend: Backend, messages: list[dict], params: GenerationParams,
                 dropped: int = 0, over_limit: int = 0,
                 cancel: threading.Event | None = None) -> Iterator[tuple[str, str]]:
    """(reply so far, stats line) pairs while the backend streams in a producer thread. Setting `cancel` (or closing
    the generator) ends decoding at the next token."""
    items: queue.SimpleQueue = queue.SimpleQueue()
    cancel = cancel or threading.Event()

    def produce() -> None:
        try:
            for chunk in backend.stream(messages, params, cancel):
                items.put((time.perf_counter(), chunk))
        except Exception as exc:  # shown in the reply below; the traceback goes to the server log
            traceback.print_exc(file=sys.stderr)
            items.put((time.perf_counter(), exc))
        finally:
            items.put(None)

    clock = ReplyClock()
    text, finish = "", None
    # In a copy of the caller's context: on ZeroGPU, spaces.GPU reads the visitor's request (whose quota pays for
    # the GPU) from Gradio's context variables, which a plain thread would not see.
    producer = threading.Thread(target=contextvars.copy_context().run, args=(produce,), name="backend-stream",
                                daemon=True)
    producer.start()
    try:
        done, next_update = False, clock.start
        while not done:
            batch = [items.get()]
            # Gather what arrives until the next update is due; the end of the stream is sent at once.
            while batch[-1] is not None:
                try:
                    batch.append(items.get(timeout=max(0.0, next_update - time.perf_counter())))
                except queue.Empty:
                    break
            for item in batch:
                if item is None:
                    done = True
                    break
                at, chunk = item
                if isinstance(chunk, Exception):
                    text += ("\n\n" if text else "") + notice(f"The model failed: {type(chunk).__name__}: {chunk}")
                    continue
                clock.add(chunk.text, chunk.tokens, at)
                text += chunk.text
                finish = chunk.finish_reason or finish
            yield text, format_stats(clock, finish, dropped, over_limit)
            next_update = time.perf_counter() + STREAM_INTERVAL
    finally:
        # Also reached when Gradio closes the generator (stop button, client gone): end decoding now.
        cancel.set()
        producer.join()


def conversation_key(session: str | None, conversation: list[dict]) -> str:
    """The backend's cache key (GenerationParams.conversation) of one conversation of one browser session: keyed by
    the session and the conversation's first message, hashed with a per-process secret so it names neither. A call
    without a session gets a key of its own, never reused."""
    if not session:
        return uuid.uuid4().hex
    first = next((m["content"] for m in conversation if m["role"] == "user"), "")
    return hmac.new(KEY_SECRET, f"{session}\0{first}".encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:32]


def read_number(label: str, value: Any, default: float, lo: float, hi: float) -> float | str:
    """A Settings value from the page or an API caller, clamped to the slider's range; a notice (str) when it is
    not a finite number (min(max(nan, lo), hi) is nan, which the backends would take)."""
    if value is None:
        return float(default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        return notice(f"{label}={shown(value)} is not valid; accepted: a number from {lo:g} to {hi:g}.")
    return min(max(number, lo), hi)


def shown(value: Any) -> str:
    """A caller's value as an error line quotes it: its repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def refuse_message(settings: Settings, text: str) -> str | None:
    """The notice for a message refused before it costs anything (empty, or over CHATBOT_MAX_INPUT_CHARS); None
    when it may go on."""
    if not text.strip():
        return notice("Please type a message.")
    if len(text) > settings.max_input_chars:
        return notice(f"Your message is {len(text)} characters long; the limit is {settings.max_input_chars} "
                      "(CHATBOT_MAX_INPUT_CHARS). Please shorten it.")
    return None


def too_long(backend: Backend, messages: list[dict], max_new_tokens: int) -> str:
    """The notice for a message that does not fit the model's context even with no history."""
    alone = backend.count_tokens(messages[:1] + messages[-1:] if len(messages) > 1 else messages)
    return notice(f"Your message is too long for this model: it needs {alone} tokens plus {max_new_tokens} new "
                  f"tokens, and the context holds {backend.n_ctx}. Please shorten it or lower “Max new tokens”.")
