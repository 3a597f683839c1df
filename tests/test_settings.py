"""Settings: defaults, parsing, and a one-line error naming variable, value and what is accepted."""
from __future__ import annotations

import pytest

from chatbot.settings import ConfigError, Settings, load_settings


def test_nothing_set_gives_the_embedded_llama_cpp_default():
    s = load_settings({})
    assert s.backend == "llama_cpp" and s.model is None and s.gguf_file is None
    assert s.n_ctx > 0 and 0 < s.max_new_tokens < s.n_ctx
    assert s.threads >= 1
    assert s.repeat_penalty == 1.2 and s.min_p == 0.05 and s.cache_mb == 1024


def test_values_are_parsed():
    s = load_settings({
        "CHATBOT_BACKEND": "Transformers", "CHATBOT_MODEL": "org/model", "CHATBOT_ADAPTER": "./adapter",
        "CHATBOT_SYSTEM_PROMPT": "  Be brief.  ", "CHATBOT_MAX_NEW_TOKENS": "64", "CHATBOT_N_CTX": "0",
        "CHATBOT_THREADS": "3", "CHATBOT_TEMPERATURE": "0", "CHATBOT_TOP_P": "1", "CHATBOT_SEED": "7",
        "CHATBOT_MAX_INPUT_CHARS": "100", "CHATBOT_OPENAI_BASE_URL": "http://h:1/v1/", "OPENAI_API_KEY": "sk-secret",
        "CHATBOT_MOCK_DELAY": "0.5", "CHATBOT_MOCK_REPLY": "hi there", "CHATBOT_REVISION": "v1",
        "CHATBOT_REPEAT_PENALTY": "1.3", "CHATBOT_MIN_P": "0", "CHATBOT_CACHE_MB": "0",
    })
    assert s == Settings(backend="transformers", model="org/model", adapter="./adapter", revision="v1",
                         system_prompt="Be brief.", max_new_tokens=64, n_ctx=0, threads=3, temperature=0.0,
                         top_p=1.0, seed=7, max_input_chars=100, openai_base_url="http://h:1/v1",
                         openai_api_key="sk-secret", mock_delay=0.5, mock_reply="hi there", repeat_penalty=1.3,
                         min_p=0.0, cache_mb=0)
    assert "sk-secret" not in repr(s)  # the key never lands in logs


def test_threads_default_from_cpu_cores_and_empty_values_mean_unset():
    s = load_settings({"CPU_CORES": "3", "CHATBOT_MODEL": "", "CHATBOT_N_CTX": " "})
    assert s.threads == 3 and s.model is None and s.n_ctx == 4096
    assert load_settings({"CPU_CORES": "3", "CHATBOT_THREADS": "1"}).threads == 1


def test_empty_system_prompt_means_none():
    assert load_settings({"CHATBOT_SYSTEM_PROMPT": ""}).system_prompt == ""


@pytest.mark.parametrize("env, var, value, accepted", [
    ({"CHATBOT_BACKEND": "nonsense"}, "CHATBOT_BACKEND", "nonsense", "llama_cpp, transformers, mock, openai"),
    ({"CHATBOT_N_CTX": "abc"}, "CHATBOT_N_CTX", "abc", "an integer >= 0"),
    ({"CHATBOT_N_CTX": "-1"}, "CHATBOT_N_CTX", "-1", "an integer >= 0"),
    ({"CHATBOT_MAX_NEW_TOKENS": "1.5"}, "CHATBOT_MAX_NEW_TOKENS", "1.5", "an integer >= 1"),
    ({"CHATBOT_MAX_NEW_TOKENS": "0"}, "CHATBOT_MAX_NEW_TOKENS", "0", "an integer >= 1"),
    ({"CHATBOT_MAX_NEW_TOKENS": "5000"}, "CHATBOT_MAX_NEW_TOKENS", "5000", "below CHATBOT_N_CTX=4096"),
    ({"CHATBOT_THREADS": "two"}, "CHATBOT_THREADS", "two", "an integer >= 1"),
    ({"CPU_CORES": "x"}, "CPU_CORES", "x", "an integer >= 1"),
    ({"CHATBOT_TEMPERATURE": "hot"}, "CHATBOT_TEMPERATURE", "hot", "a number >= 0 and <= 2"),
    ({"CHATBOT_TEMPERATURE": "nan"}, "CHATBOT_TEMPERATURE", "nan", "a number >= 0 and <= 2"),
    ({"CHATBOT_TOP_P": "0"}, "CHATBOT_TOP_P", "0", "a number > 0 and <= 1"),
    ({"CHATBOT_TOP_P": "1.5"}, "CHATBOT_TOP_P", "1.5", "a number > 0 and <= 1"),
    ({"CHATBOT_SEED": "-3"}, "CHATBOT_SEED", "-3", "an integer >= 0"),
    ({"CHATBOT_MAX_INPUT_CHARS": "lots"}, "CHATBOT_MAX_INPUT_CHARS", "lots", "an integer >= 1"),
    ({"CHATBOT_MOCK_DELAY": "slow"}, "CHATBOT_MOCK_DELAY", "slow", "a number >= 0"),
    ({"CHATBOT_REPEAT_PENALTY": "0.9"}, "CHATBOT_REPEAT_PENALTY", "0.9", "a number >= 1 and <= 2"),
    ({"CHATBOT_MIN_P": "1.5"}, "CHATBOT_MIN_P", "1.5", "a number >= 0 and <= 1"),
    ({"CHATBOT_CACHE_MB": "-1"}, "CHATBOT_CACHE_MB", "-1", "an integer >= 0"),
    ({"CHATBOT_CACHE_MB": "1.5GB"}, "CHATBOT_CACHE_MB", "1.5GB", "an integer >= 0"),
    ({"CHATBOT_OPENAI_BASE_URL": "localhost:8080"}, "CHATBOT_OPENAI_BASE_URL", "localhost:8080", "http://"),
    ({"CHATBOT_GGUF_FILE": "*.gguf"}, "CHATBOT_GGUF_FILE", "*.gguf", "CHATBOT_MODEL must be set"),
    ({"CHATBOT_ADAPTER": "a/b"}, "CHATBOT_ADAPTER", "a/b", "CHATBOT_BACKEND=transformers"),
])
def test_bad_values_raise_one_line_naming_variable_value_and_accepted(env, var, value, accepted):
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{var}={value!r}")
    assert "accepted:" in message and accepted in message
