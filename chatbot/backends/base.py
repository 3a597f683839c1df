"""What every backend provides, and the one helper they share to serialise calls into the model."""
from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from typing import Iterator, Protocol

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 512
    temperature: float = 0.2
    top_p: float = 0.9
    min_p: float = 0.05          # drop tokens below min_p × the top token's probability (llama.cpp's default)
    repeat_penalty: float = 1.0  # llama.cpp's meaning: logits of tokens among the last REPEAT_LAST_N generated ones
    #                              are divided (positive) or multiplied (negative) by it; 1 = off. The app passes
    #                              CHATBOT_REPEAT_PENALTY (default 1.2), so here 1.0 keeps the plain model's reply.
    seed: int | None = None      # the app passes a fresh random seed per request (CHATBOT_SEED fixes it)
    conversation: str | None = None  # opaque cache key: one conversation of one browser session. A backend that
    #                                  keeps prompt/KV state reuses it only for a request with the same key; None
    #                                  (scripts, benchmarks, tests) reuses only state saved under None.
    keep_state: bool = True  # False: the request neither reuses saved state nor leaves any (the Arena's battles,
    #                          so that they do not push the chat's conversations out of the cache)


REPEAT_LAST_N = 64  # llama-cpp-python's last_n_tokens_size: the window the repeat penalty looks at


@dataclass(frozen=True)
class Chunk:
    text: str
    finish_reason: str | None = None  # set on the last chunk only: "stop" | "length" | "cancelled"
    tokens: int = 0                   # new tokens this chunk stands for (for tokens/s)


class Backend(Protocol):
    name: str             # registry name, e.g. "llama_cpp"
    model_name: str       # what is being served, for the page title and logs
    n_ctx: int            # context length prompt + new tokens must fit in
    max_concurrency: int  # requests the backend may serve at once (1 = one at a time)

    def count_tokens(self, messages: list[dict]) -> int:
        """Prompt tokens after the model's own chat template, generation prompt included."""

    def stream(self, messages: list[dict], params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """Reply chunk by chunk; returns between tokens once `cancel` is set or the generator is closed."""


def fresh_seed() -> int:
    """A random sampling seed for one request: 32-bit, as llama.cpp's are, avoiding 0xFFFFFFFF ("pick one")."""
    return secrets.randbelow(0xFFFFFFFF)


def cancelled(cancel: threading.Event | None) -> bool:
    return cancel is not None and cancel.is_set()


def acquire(lock: threading.Lock, cancel: threading.Event | None) -> bool:
    """Wait for the model, giving up if the request is cancelled while queued."""
    while not lock.acquire(timeout=0.05):
        if cancelled(cancel):
            return False
    return True
