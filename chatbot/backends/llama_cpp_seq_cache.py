"""Per-conversation prompt cache for the batched llama.cpp path: one sequence's KV cells, saved with llama.cpp's
per-sequence state call after each reply, kept per conversation key, bounded in bytes.

A returning conversation's state is copied back into whichever sequence serves it, trimmed to the tokens its new
prompt shares with it, and only the rest of the prompt is evaluated. A state is only ever given to a request with
the same key (GenerationParams.conversation), never to another conversation with the same opening words: a guess
of someone else's message must not be answered faster when it is right.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from chatbot.backends.llama_cpp_cache import IDLE_SECONDS


@dataclass
class SavedSequence:
    tokens: tuple[int, ...]  # the tokens whose KV cells `state` holds, from position 0
    state: bytes             # llama_state_seq_get_data's bytes
    used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return len(self.state) + 4 * len(self.tokens)


class SequenceCache:
    """Conversation key -> its latest SavedSequence; least recently used first out once over capacity_bytes, and
    idle ones dropped after idle_seconds."""

    def __init__(self, capacity_bytes: int, idle_seconds: float = IDLE_SECONDS):
        self.capacity_bytes = capacity_bytes
        self.idle_seconds = idle_seconds
        self.entries: OrderedDict[str | None, SavedSequence] = OrderedDict()
        self.lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self.lock:
            return sum(e.nbytes for e in self.entries.values())

    def get(self, key: str | None) -> SavedSequence | None:
        with self.lock:
            self.expire()
            saved = self.entries.get(key)
            if saved is not None:
                saved.used = time.monotonic()
                self.entries.move_to_end(key)
            return saved

    def put(self, key: str | None, saved: SavedSequence) -> None:
        """Keep `saved` as the conversation's state (replacing its earlier one), then evict down to the capacity."""
        with self.lock:
            self.entries.pop(key, None)
            if saved.nbytes > self.capacity_bytes:
                return  # larger than the whole budget: keeping it would only evict everything else
            self.entries[key] = saved
            total = sum(e.nbytes for e in self.entries.values())
            while total > self.capacity_bytes:
                _, evicted = self.entries.popitem(last=False)
                total -= evicted.nbytes
            self.expire()

    def expire(self) -> None:
        cutoff = time.monotonic() - self.idle_seconds
        for key in [k for k, e in self.entries.items() if e.used < cutoff]:
            del self.entries[key]


def shared_prefix(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    """How many tokens a and b share from the start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
