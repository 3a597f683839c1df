"""The mock backend: what the app-level and browser tests rely on."""
from __future__ import annotations

import threading
import time

import pytest

from chatbot.backends import BACKENDS, GenerationParams, load_backend
from chatbot.settings import ConfigError, Settings, load_settings


def mock(**env) -> object:
    return load_backend(load_settings({"CHATBOT_BACKEND": "mock", **env}))


def test_registry_names_match_settings():
    from chatbot.settings import BACKEND_NAMES
    assert tuple(BACKENDS) == BACKEND_NAMES


def test_unknown_backend_in_settings_object_is_a_config_error():
    with pytest.raises(ConfigError, match="CHATBOT_BACKEND='nope'"):
        load_backend(Settings(backend="nope"))


def test_streams_echo_naming_system_prompt_and_settings():
    backend = mock(CHATBOT_MOCK_DELAY="0")
    messages = [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Hello there"}]
    chunks = list(backend.stream(messages, GenerationParams(max_new_tokens=100, temperature=0.3, top_p=0.8)))
    text = "".join(c.text for c in chunks)
    assert len(chunks) > 5 and all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == "stop"
    assert "Hello there" in text and "Be a pirate." in text
    assert "temperature=0.3" in text and "top_p=0.8" in text and "max_new_tokens=100" in text
    assert sum(c.tokens for c in chunks) == len(text.split())


def test_max_new_tokens_cuts_with_length():
    backend = mock(CHATBOT_MOCK_DELAY="0", CHATBOT_MOCK_REPLY="one two three four five")
    chunks = list(backend.stream([{"role": "user", "content": "x"}], GenerationParams(max_new_tokens=2)))
    assert "".join(c.text for c in chunks) == "one two" and chunks[-1].finish_reason == "length"


def test_cancel_ends_stream_between_tokens_without_waiting_for_delay():
    backend = mock(CHATBOT_MOCK_DELAY="5", CHATBOT_MOCK_REPLY="a b c")
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    start = time.perf_counter()
    chunks = list(backend.stream([{"role": "user", "content": "x"}], GenerationParams(), cancel))
    assert time.perf_counter() - start < 2
    assert chunks[-1].finish_reason == "cancelled" and not "".join(c.text for c in chunks)


def test_count_tokens_grows_with_messages():
    backend = mock()
    one = backend.count_tokens([{"role": "user", "content": "a b c"}])
    two = backend.count_tokens([{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "d"}])
    assert 3 < one < two


def test_backend_whose_package_is_missing_is_a_config_error(monkeypatch):
    import chatbot.backends as backends

    def needs_missing_package(settings):
        import no_such_package_for_tests  # noqa: F401

    monkeypatch.setitem(backends.BACKENDS, "mock", needs_missing_package)
    with pytest.raises(ConfigError, match=r"^CHATBOT_BACKEND='mock' needs the package 'no_such_package_for_tests'"):
        load_backend(load_settings({"CHATBOT_BACKEND": "mock"}))
