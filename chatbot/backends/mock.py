"""A model-free backend for tests and UI work: streams a canned or echoed reply word by word.

The echo names the system prompt, the sampling settings and how many messages arrived, so a test
(or a person in the browser) can see that each setting and the history trimming reached the backend. With
CHATBOT_MODEL set, that name is the mock's model name and starts its echo: two mocks (the Arena's) tell apart.
CHATBOT_MOCK_DELAY slows it down enough to press stop mid-reply.
"""
from __future__ import annotations

import re
import threading
from typing import Iterator

from chatbot.backends.base import Chunk, GenerationParams, cancelled
from chatbot.settings import Settings

PER_MESSAGE_TOKENS = 4  # stands in for a chat template's role markers
GENERATION_PROMPT_TOKENS = 2


def _words(text: str) -> list[str]:
    # A "token" is a word with its leading whitespace, so joining the pieces restores the text exactly.
    return re.findall(r"\s*\S+", text) or ([text] if text else [])


class MockBackend:
    name = "mock"
    max_concurrency = 4  # no shared model state: lets tests check that parallel users never mix replies

    def __init__(self, settings: Settings):
        self.model_name = settings.model or "mock"
        self.named = settings.model is not None
        self.n_ctx = settings.n_ctx or 4096
        self.delay = settings.mock_delay
        self.reply = settings.mock_reply

    def count_tokens(self, messages: list[dict]) -> int:
        return GENERATION_PROMPT_TOKENS + sum(
            PER_MESSAGE_TOKENS + len(_words(m["content"])) for m in messages)

    def compose(self, messages: list[dict], params: GenerationParams) -> str:
        if self.reply is not None:
            return self.reply
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        user = messages[-1]["content"] if messages else ""
        name = f"[{self.model_name}] " if self.named else ""
        return (f"{name}You said: {user} | system prompt: {system or '(none)'} | "
                f"temperature={params.temperature:g} top_p={params.top_p:g} "
                f"max_new_tokens={params.max_new_tokens} repeat_penalty={params.repeat_penalty:g} "
                f"min_p={params.min_p:g} | messages: {len(messages)}")

    def stream(self, messages: list[dict], params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[Chunk]:
        cancel = cancel or threading.Event()
        words = _words(self.compose(messages, params))
        for i, word in enumerate(words[:params.max_new_tokens]):
            # wait() rather than sleep(): a stop request ends the reply at once, not after the delay.
            if self.delay and cancel.wait(self.delay) or cancelled(cancel):
                yield Chunk("", "cancelled")
                return
            yield Chunk(word, tokens=1)
        yield Chunk("", "length" if len(words) > params.max_new_tokens else "stop")
