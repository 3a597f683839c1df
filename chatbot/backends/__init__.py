"""Backend registry: CHATBOT_BACKEND name → factory(settings) → Backend. Heavy imports happen in the factory."""
from __future__ import annotations

import re
from typing import Callable

from chatbot.backends.base import Backend, Chunk, GenerationParams
from chatbot.settings import ConfigError, Settings, arena_settings


def _llama_cpp(settings: Settings) -> Backend:
    if settings.parallel > 1:  # CHATBOT_PARALLEL conversations in one batch; 1 keeps the serial backend
        from chatbot.backends.llama_cpp_batched import BatchedLlamaCppBackend
        return BatchedLlamaCppBackend(settings)
    from chatbot.backends.llama_cpp import LlamaCppBackend
    return LlamaCppBackend(settings)


def _transformers(settings: Settings) -> Backend:
    from chatbot.backends.transformers import TransformersBackend
    return TransformersBackend(settings)


def _mock(settings: Settings) -> Backend:
    from chatbot.backends.mock import MockBackend
    return MockBackend(settings)


def _openai(settings: Settings) -> Backend:
    from chatbot.backends.openai import OpenAIBackend
    return OpenAIBackend(settings)


BACKENDS: dict[str, Callable[[Settings], Backend]] = {
    "llama_cpp": _llama_cpp,
    "transformers": _transformers,
    "mock": _mock,
    "openai": _openai,
}


def load_backend(settings: Settings) -> Backend:
    """Load the model once; raises ConfigError when the user's settings name something unusable."""
    try:
        factory = BACKENDS[settings.backend]
    except KeyError:
        raise ConfigError(f"CHATBOT_BACKEND={settings.backend!r} is not valid; "
                          f"accepted: {', '.join(BACKENDS)}") from None
    try:
        return factory(settings)
    except ModuleNotFoundError as exc:
        # e.g. transformers on a Space whose requirements.txt leaves torch out: a set-up choice, not a bug.
        raise ConfigError(f"CHATBOT_BACKEND={settings.backend!r} needs the package {exc.name!r}, which is not "
                          f"installed; accepted: a backend whose packages are installed (pip install "
                          f"{exc.name}, or -r requirements-dev.txt)") from None


def load_arena_backend(settings: Settings) -> Backend | None:
    """The Arena's second model (CHATBOT_ARENA_MODEL), loaded once like the chat's; None when the Arena is off.
    Its errors name the arena variables (CHATBOT_ARENA_MODEL, CHATBOT_ARENA_GGUF_FILE), not the chat's."""
    arena = arena_settings(settings)
    if arena is None:
        return None
    try:
        return load_backend(arena)
    except ConfigError as exc:
        raise ConfigError(re.sub(r"\bCHATBOT_(MODEL|GGUF_FILE)\b", r"CHATBOT_ARENA_\1", str(exc))) from None


__all__ = ["BACKENDS", "Backend", "Chunk", "GenerationParams", "load_arena_backend", "load_backend"]
