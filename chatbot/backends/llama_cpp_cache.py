"""Per-conversation prompt cache for llama.cpp: llama-cpp-python's own LlamaRAMCache (model states keyed by token
prefix, least recently used evicted first), with its size counted in the bytes the states really hold.

After each reply llama-cpp-python saves the model state (the KV cells of prompt + reply) under those tokens; the
next prompt that extends a cached prefix restores it and evaluates only the new tokens, whoever chatted in between.
"""
from __future__ import annotations

from typing import Sequence

from llama_cpp import LlamaRAMCache
from llama_cpp.llama import LlamaState


def state_bytes(state: LlamaState) -> int:
    """What a saved state occupies in RAM: llama.cpp's serialised context plus the two numpy arrays kept with it."""
    return len(state.llama_state) + state.scores.nbytes + state.input_ids.nbytes


class ConversationCache(LlamaRAMCache):
    """LlamaRAMCache with two changes, both about memory:

    - `cache_size` counts every byte of a state. LlamaRAMCache counts only llama.cpp's part, but save_state also
      copies the logits of the last batch (up to n_batch × vocabulary floats: 96 MiB for SmolLM2 at n_batch 512),
      which a model without logits_all never reads again (load_state makes the next call re-evaluate at least one
      token); they are cut to one row before the state is stored.
    - A conversation keeps one entry: its new state replaces the states whose tokens are a prefix of it (its
      earlier turns), which would otherwise fill the cache with copies of the same KV cells.
    """

    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes=capacity_bytes)

    @property
    def cache_size(self) -> int:
        return sum(state_bytes(state) for state in self.cache_state.values())

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        key = tuple(key)
        value.scores = value.scores[-1:].copy()  # load_state broadcasts one row into the rows it restores
        for older in [k for k in self.cache_state if len(k) <= len(key) and key[:len(k)] == k]:
            del self.cache_state[older]
        if state_bytes(value) > self.capacity_bytes:
            return  # larger than the whole budget: keeping it would only evict everything else
        super().__setitem__(key, value)  # stores, then evicts least recently used until within capacity
