"""Per-conversation prompt cache for llama.cpp: llama-cpp-python's own LlamaRAMCache (model states keyed by token
prefix, least recently used evicted first), with its size counted in the bytes the states really hold, and every
state owned by one conversation (GenerationParams.conversation: one conversation of one browser session).

After each reply llama-cpp-python saves the model state (the KV cells of prompt + reply) under those tokens; the
next prompt of the same conversation that extends a cached prefix restores it and evaluates only the new tokens,
whoever chatted in between. A state is never restored for another conversation, even when its tokens are a prefix
of the prompt: otherwise a guess of someone else's message would be answered faster when it is right.
"""
from __future__ import annotations

import time
from typing import Sequence

from llama_cpp import LlamaRAMCache
from llama_cpp.llama import Llama, LlamaState

IDLE_SECONDS = 3600  # a conversation's state is dropped once it has been idle this long (checked on every request)


def state_bytes(state: LlamaState) -> int:
    """What a saved state occupies in RAM: llama.cpp's serialised context plus the two numpy arrays kept with it."""
    return len(state.llama_state) + state.scores.nbytes + state.input_ids.nbytes


class ConversationCache(LlamaRAMCache):
    """LlamaRAMCache with three changes, about memory and privacy:

    - `cache_size` counts every byte of a state. LlamaRAMCache counts only llama.cpp's part, but save_state also
      copies the logits of the last batch (up to n_batch × vocabulary floats: 96 MiB for SmolLM2 at n_batch 512),
      which a model without logits_all never reads again (load_state makes the next call re-evaluate at least one
      token); they are cut to one row before the state is stored.
    - A conversation keeps one entry: its new state replaces the states of the same conversation whose tokens are a
      prefix of it (its earlier turns), which would otherwise fill the cache with copies of the same KV cells.
    - Each state belongs to the conversation that was `current` when it was saved; lookups see only the current
      conversation's states. The backend sets `current` under its model lock before each request. States idle for
      IDLE_SECONDS are dropped at the next lookup or save. While `keeping` is False (a request that keeps no state,
      GenerationParams.keep_state) lookups find nothing and nothing is saved.
    """

    def __init__(self, capacity_bytes: int, idle_seconds: float = IDLE_SECONDS):
        super().__init__(capacity_bytes=capacity_bytes)
        self.current: str | None = None
        self.keeping = True  # False while a request that keeps no state runs: no lookup finds, no save stays
        self.owners: dict[tuple[int, ...], str | None] = {}
        self.used: dict[tuple[int, ...], float] = {}
        self.idle_seconds = idle_seconds

    @property
    def cache_size(self) -> int:
        return sum(state_bytes(state) for state in self.cache_state.values())

    def forget(self, key: tuple[int, ...]) -> None:
        self.cache_state.pop(key, None)
        self.owners.pop(key, None)
        self.used.pop(key, None)

    def expire(self, now: float | None = None) -> None:
        """Drop every state idle for longer than idle_seconds."""
        cutoff = (time.monotonic() if now is None else now) - self.idle_seconds
        for key in [k for k, t in self.used.items() if t < cutoff]:
            self.forget(key)

    def _find_longest_prefix_key(self, key: tuple[int, ...]) -> tuple[int, ...] | None:
        best, best_len = None, 0
        for k in self.cache_state:
            if not self.keeping or self.owners.get(k) != self.current:
                continue
            n = Llama.longest_token_prefix(k, key)
            if n > best_len:
                best, best_len = k, n
        return best

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        self.expire()
        found = self._find_longest_prefix_key(tuple(key))
        if found is None:
            raise KeyError("no state of this conversation")
        self.cache_state.move_to_end(found)
        self.used[found] = time.monotonic()
        return self.cache_state[found]

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        self.expire()
        if not self.keeping:
            return
        key = tuple(key)
        value.scores = value.scores[-1:].copy()  # load_state broadcasts one row into the rows it restores
        for older in [k for k in self.cache_state if self.owners.get(k) == self.current
                      and len(k) <= len(key) and key[:len(k)] == k]:
            self.forget(older)
        self.forget(key)  # the same tokens saved by another conversation: this one owns them now
        if state_bytes(value) > self.capacity_bytes:
            return  # larger than the whole budget: keeping it would only evict everything else
        self.cache_state[key] = value
        self.owners[key], self.used[key] = self.current, time.monotonic()
        while self.cache_size > self.capacity_bytes and self.cache_state:
            self.forget(next(iter(self.cache_state)))  # least recently used first
