"""Backend registry: CHATBOT_BACKEND name → factory(settings) → Backend. Heavy imports happen in the factory."""
from __future__ import annotations

from typing import Callable

from chatbot.backends.base import Backend, Chunk, GenerationParams
from chatbot.settings import ConfigError, Settings


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


__all__ = ["BACKENDS", "Backend", "Chunk", "GenerationParams", "load_backend"]
