"""Backend registry: CHATBOT_BACKEND name → factory(settings) → Backend. Heavy imports happen in the factory."""
from __future__ import annotations

from typing import Callable

from chatbot.backends.base import Backend, Chunk, GenerationParams
from chatbot.settings import ConfigError, Settings


def _llama_cpp(settings: Settings) -> Backend:
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
    return factory(settings)


__all__ = ["BACKENDS", "Backend", "Chunk", "GenerationParams", "load_backend"]
