"""The default backend on the real embedded SmolLM2-135M-Instruct GGUF, and GGUF resolution."""
from __future__ import annotations

import threading

import pytest

from chatbot.backends import GenerationParams, load_backend
from chatbot.model_files import resolve_gguf
from chatbot.settings import ConfigError, load_settings

GREETING = [{"role": "user", "content": "Hello! How are you?"}]
# One thread: llama.cpp's threads spin at barriers, so on a shared, oversubscribed CI machine two threads
# can be 20× slower than one (measured here: 0.5 vs 13 tokens/s under load).
THREADS = {"CHATBOT_THREADS": "1"}
SERIAL = {"CHATBOT_PARALLEL": "1"}  # this file tests the serial backend (test_backend_llama_cpp_batched.py the other)


@pytest.fixture(scope="module")
def smol():
    # Prompt cache off: these tests compare a prompt's greedy reply with the same prompt asked again, and a cached
    # state of that very prompt makes llama.cpp re-evaluate its last token alone instead of in the prompt's batch,
    # which may change a near-tie (test_backend_llama_cpp_cache.py covers the cache).
    return load_backend(load_settings({"CHATBOT_N_CTX": "2048", "CHATBOT_CACHE_MB": "0", **THREADS, **SERIAL}))


def test_embedded_model_answers_a_greeting_and_stops_by_itself(smol, smollm2_gguf):
    assert smol.path == smollm2_gguf and smol.n_ctx == 2048
    chunks = list(smol.stream(GREETING, GenerationParams(max_new_tokens=200, temperature=0)))
    text = "".join(c.text for c in chunks)
    assert text.strip() and "<|im_end|>" not in text
    assert chunks[-1].finish_reason == "stop"
    assert 0 < sum(c.tokens for c in chunks) < 200


def test_prompt_is_the_ggufs_own_chat_template(smol, smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    assert smol.llm.chat_format == "chat_template.default"  # not llama-cpp-python's hand-written "chatml"
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    # SmolLM2's template inserts its own default system prompt when there is none: a hand-written
    # ChatML format would not, so the counts would differ for the second case.
    for messages in ([{"role": "system", "content": "Answer in French."}] + GREETING, GREETING):
        expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert smol.count_tokens(messages) == len(expected)
    assert "SmolLM" in smol.formatter(messages=GREETING).prompt


def test_cancel_between_tokens_frees_the_model(smol):
    cancel = threading.Event()
    chunks = []
    for chunk in smol.stream([{"role": "user", "content": "Write a long story about a dragon."}],
                             GenerationParams(max_new_tokens=300, temperature=0.8, seed=1), cancel):
        chunks.append(chunk)
        if sum(c.tokens for c in chunks) >= 3:
            cancel.set()
    assert chunks[-1].finish_reason == "cancelled" and sum(c.tokens for c in chunks) == 3
    assert smol.lock.acquire(blocking=False)
    smol.lock.release()


def test_closing_the_generator_frees_the_model(smol):
    stream = smol.stream(GREETING, GenerationParams(max_new_tokens=100, temperature=0))
    next(stream)
    stream.close()
    assert smol.lock.acquire(blocking=False)
    smol.lock.release()


def test_parallel_callers_are_serialised_and_get_their_own_answers(smol):
    prompts = ["Name a colour.", "Name an animal."]
    params = GenerationParams(max_new_tokens=24, temperature=0)
    expected = ["".join(c.text for c in smol.stream([{"role": "user", "content": p}], params)) for p in prompts]
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        got[i] = "".join(c.text for c in smol.stream([{"role": "user", "content": prompts[i]}], params))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got[0], got[1]] == expected  # no GGML crash, no mixed-up text


def test_n_ctx_zero_means_the_trained_length(smollm2_gguf):
    backend = load_backend(load_settings({"CHATBOT_N_CTX": "0", **THREADS, **SERIAL}))
    assert backend.n_ctx == int(backend.llm.metadata["llama.context_length"]) > 2048


# --- resolution: local dirs, globs, an offline Hub cache -----------------------------------------------------

@pytest.fixture
def gguf_dir(tmp_path, smollm2_gguf):
    for name in ("smol-Q4_1.gguf", "smol-Q8_0.gguf"):
        (tmp_path / name).symlink_to(smollm2_gguf)
    (tmp_path / "README.md").write_text("x")
    return tmp_path


def test_glob_picks_one_file_in_a_directory(gguf_dir):
    assert resolve_gguf(str(gguf_dir), "*Q8_0.gguf") == gguf_dir / "smol-Q8_0.gguf"
    assert resolve_gguf(str(gguf_dir), "smol-Q4_1.gguf") == gguf_dir / "smol-Q4_1.gguf"


@pytest.mark.parametrize("pattern, message", [
    ("*Q5_K_M.gguf", "CHATBOT_GGUF_FILE='*Q5_K_M.gguf' matches no file in"),
    ("*.gguf", "CHATBOT_GGUF_FILE='*.gguf' matches 2 files in"),
    (None, "CHATBOT_GGUF_FILE (unset) matches 2 files in"),
])
def test_glob_that_does_not_pick_exactly_one_file_is_a_config_error(gguf_dir, pattern, message):
    with pytest.raises(ConfigError) as info:
        resolve_gguf(str(gguf_dir), pattern)
    text = str(info.value)
    assert text.startswith(message) and "smol-Q4_1.gguf" in text and "smol-Q8_0.gguf" in text
    assert "\n" not in text


def hub_cache(root, smollm2_gguf, repo="someone/smol-gguf"):
    """The real huggingface_hub cache layout: refs/main → commit, snapshots/<commit>/<files>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("smol-Q4_1.gguf", "smol-Q8_0.gguf"):
        (snapshot / name).symlink_to(smollm2_gguf)
    return snapshot


def test_hub_repo_resolves_from_the_offline_cache(tmp_path, smollm2_gguf, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = hub_cache(tmp_path, smollm2_gguf)
    assert resolve_gguf("someone/smol-gguf", "*Q4_1.gguf") == snapshot / "smol-Q4_1.gguf"
    with pytest.raises(ConfigError, match=r"^CHATBOT_GGUF_FILE='\*Q2_K.gguf' matches no file in 'someone/smol"):
        resolve_gguf("someone/smol-gguf", "*Q2_K.gguf")
    with pytest.raises(ConfigError, match=r"^CHATBOT_MODEL='someone/other' could not be fetched from the Hub"):
        resolve_gguf("someone/other", "*.gguf")
    # The backend opens what was resolved.
    backend = load_backend(load_settings({"CHATBOT_MODEL": "someone/smol-gguf", "CHATBOT_GGUF_FILE": "*Q8_0*",
                                          "CHATBOT_N_CTX": "1024", **THREADS}))
    assert backend.model_name == "smol-Q8_0.gguf"


@pytest.mark.parametrize("setup, message", [
    (lambda d: str(d / "missing.gguf"), "does not exist"),
    (lambda d: (d / "broken.gguf").write_bytes(b"not a gguf") and str(d / "broken.gguf"), "could not be loaded"),
    (lambda d: (d / "x.txt").write_text("x") and str(d), "holds no .gguf file"),
])
def test_unusable_model_paths_fail_with_one_line(tmp_path, setup, message):
    value = setup(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_backend(load_settings({"CHATBOT_MODEL": value}))
    text = str(info.value)
    assert text.startswith(f"CHATBOT_MODEL={value!r}") and message in text and "accepted:" in text
    assert "\n" not in text
