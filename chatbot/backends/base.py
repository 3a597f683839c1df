"""What every backend provides, and the one helper they share to serialise calls into the model."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator, Protocol

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 512
    temperature: float = 0.2
    top_p: float = 0.9
    seed: int | None = None


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


def cancelled(cancel: threading.Event | None) -> bool:
    return cancel is not None and cancel.is_set()
