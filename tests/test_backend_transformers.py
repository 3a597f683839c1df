"""The transformers backend: tiny random-weight Llama with SmolLM2's tokenizer and chat template, a PEFT
adapter on top of it, and SmolLM2 itself through transformers' GGUF loading."""
from __future__ import annotations

import threading

import pytest

from chatbot.backends import GenerationParams, load_backend
from chatbot.settings import ConfigError, load_settings

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}]


def backend_for(**env):
    return load_backend(load_settings({"CHATBOT_BACKEND": "transformers", "CHATBOT_THREADS": "1", **env}))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return backend_for(CHATBOT_MODEL=str(tiny_llama_dir), CHATBOT_N_CTX="1024")


def test_count_tokens_uses_the_models_own_template(tiny, smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n") and "You are terse." in prompt
    assert tiny.count_tokens(MESSAGES) == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert tiny.n_ctx == 1024


def test_streams_tokens_and_reports_length(tiny):
    chunks = list(tiny.stream(MESSAGES, GenerationParams(max_new_tokens=12, temperature=0)))
    assert chunks[-1].finish_reason in ("length", "stop")
    assert all(c.finish_reason is None for c in chunks[:-1])
    generated = sum(c.tokens for c in chunks)
    assert 1 <= generated <= 12
    if chunks[-1].finish_reason == "length":
        assert generated == 12


def test_greedy_is_deterministic_and_seeded_sampling_repeats(tiny):
    def text(params):
        return "".join(c.text for c in tiny.stream(MESSAGES, params))
    assert text(GenerationParams(max_new_tokens=8, temperature=0)) == text(GenerationParams(max_new_tokens=8,
                                                                                            temperature=0))
    sampled = GenerationParams(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=5)
    assert text(sampled) == text(sampled)


def test_cancel_stops_generation_and_frees_the_model(tiny):
    cancel = threading.Event()
    stream = tiny.stream(MESSAGES, GenerationParams(max_new_tokens=1000, temperature=1.0, top_p=1.0, seed=1), cancel)
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.text:
            cancel.set()
    assert chunks[-1].finish_reason == "cancelled"
    assert sum(c.tokens for c in chunks) < 100
    assert tiny.lock.acquire(blocking=False)
    tiny.lock.release()


def test_closing_the_generator_frees_the_model(tiny):
    stream = tiny.stream(MESSAGES, GenerationParams(max_new_tokens=1000, temperature=1.0, top_p=1.0, seed=2))
    next(c for c in stream if c.text)
    stream.close()
    assert tiny.lock.acquire(blocking=False)
    tiny.lock.release()


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    # init_lora_weights=False: random B too, so the adapter really changes the model's output.
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


def test_base_plus_adapter_loads_through_peft(tiny_llama_dir, adapter_dir, tiny):
    with_adapter = backend_for(CHATBOT_MODEL=str(tiny_llama_dir), CHATBOT_ADAPTER=str(adapter_dir))
    assert "adapter" in with_adapter.model_name
    base_q = tiny.model.model.layers[0].self_attn.q_proj.weight
    merged_q = with_adapter.model.model.layers[0].self_attn.q_proj.weight
    assert merged_q.shape == base_q.shape and not merged_q.equal(base_q)  # LoRA merged into the weights
    chunks = list(with_adapter.stream(MESSAGES, GenerationParams(max_new_tokens=6, temperature=0)))
    assert chunks[-1].finish_reason in ("length", "stop")


def test_adapter_alone_finds_its_base_model(adapter_dir, tiny_llama_dir):
    backend = backend_for(CHATBOT_ADAPTER=str(adapter_dir))
    assert backend.model_name.startswith(tiny_llama_dir.name)


@pytest.mark.slow
def test_smollm2_through_transformers_gguf_loading_answers(smollm2_gguf):
    backend = backend_for(CHATBOT_MODEL=str(smollm2_gguf), CHATBOT_N_CTX="2048")
    chunks = list(backend.stream([{"role": "user", "content": "Hello!"}],
                                 GenerationParams(max_new_tokens=48, temperature=0)))
    text = "".join(c.text for c in chunks)
    assert text.strip() and "<|im_end|>" not in text
    assert chunks[-1].finish_reason in ("stop", "length")


@pytest.mark.parametrize("env, starts", [
    ({"CHATBOT_MODEL": "./no/such/dir"}, "CHATBOT_MODEL='./no/such/dir' does not exist"),
    ({"CHATBOT_MODEL": "nobody/not-cached-model"}, "CHATBOT_MODEL='nobody/not-cached-model' could not be loaded"),
    ({"CHATBOT_ADAPTER": "./no/adapter"}, "CHATBOT_ADAPTER='./no/adapter' does not exist"),
])
def test_bad_model_settings_fail_with_one_line(env, starts):
    with pytest.raises(ConfigError) as info:
        backend_for(**env)
    assert str(info.value).startswith(starts) and "\n" not in str(info.value) and "accepted:" in str(info.value)


def test_directory_that_is_not_a_model_fails_with_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError, match=r"^CHATBOT_MODEL=.*could not be loaded by transformers.*accepted:"):
        backend_for(CHATBOT_MODEL=str(tmp_path))


def _first_forward_lengths(backend) -> list[int]:
    """Tokens each generation's first forward pass processes (the prompt's part not already in the kept cache)."""
    lengths, original = [], backend.model.forward
    state = {"new": True}

    def forward(*args, **kwargs):
        if state["new"]:
            lengths.append(kwargs["input_ids"].shape[1])
            state["new"] = False
        return original(*args, **kwargs)

    backend.model.forward = forward
    return lengths, state


def test_the_last_conversation_keeps_its_cache_and_replies_do_not_change(tiny_llama_dir):
    reuse = backend_for(CHATBOT_MODEL=str(tiny_llama_dir), CHATBOT_N_CTX="1024")
    lengths, state = _first_forward_lengths(reuse)
    params = GenerationParams(max_new_tokens=10, temperature=0, repeat_penalty=1.1)
    history, with_cache, afresh, prompts = list(MESSAGES[:1]), [], [], []
    for message in ("Hello!", "Tell me about the sea.", "And the mountains?"):
        history.append({"role": "user", "content": message})
        prompts.append(reuse.count_tokens(history))
        state["new"] = True
        with_cache.append("".join(c.text for c in reuse.stream(history, params)))
        reuse.kept, kept = None, reuse.kept  # the same turn without the kept cache: the whole prompt again
        state["new"] = True
        afresh.append("".join(c.text for c in reuse.stream(history, params)))
        reuse.kept = kept
        history.append({"role": "assistant", "content": with_cache[-1]})
    assert with_cache == afresh
    # lengths: (turn 1, turn 1 afresh, turn 2, turn 2 afresh, ...): with the cache only the new message is processed
    assert lengths[1::2] == prompts
    assert all(n < p - 10 for n, p in zip(lengths[2::2], prompts[1:])), (lengths, prompts)


def test_repeat_penalty_counts_only_recent_generated_tokens(tiny):
    import torch

    _, _, penalty_cls = tiny._classes
    penalty = penalty_cls(2.0, prompt_length=3)
    ids = torch.tensor([[5, 6, 7, 8, 8]])  # prompt 5 6 7, generated 8 8
    scores = torch.ones(1, 10)
    out = penalty(ids, scores.clone())
    assert out[0, 8] == 0.5 and out[0, 5] == 1.0  # a prompt token is not penalised, a generated one once
    assert torch.equal(penalty(ids[:, :3], scores.clone()), scores)  # nothing generated yet: nothing changes


def test_the_kept_cache_serves_only_its_own_conversation(tiny_llama_dir):
    backend = backend_for(CHATBOT_MODEL=str(tiny_llama_dir), CHATBOT_N_CTX="1024")
    lengths, state = _first_forward_lengths(backend)
    for key in ("alice", "bob", "bob"):  # the same prompt each time: only bob's second turn may reuse a cache
        state["new"] = True
        list(backend.stream(MESSAGES, GenerationParams(max_new_tokens=6, temperature=0, conversation=key)))
    full = backend.count_tokens(MESSAGES)
    assert lengths == [full, full, 1]
    # A request that keeps no state (an Arena battle in bob's session) reuses nothing and leaves bob's cache kept.
    kept = backend.kept
    state["new"] = True
    list(backend.stream(MESSAGES, GenerationParams(max_new_tokens=6, temperature=0, conversation="bob",
                                                   keep_state=False)))
    assert lengths[-1] == full and backend.kept is kept


def test_a_reply_on_zerogpu_stops_when_its_reserved_seconds_run_out(tiny_llama_dir):
    """What runs in ZeroGPU's worker: decoding ends START_S before the reservation does, as a cut reply."""
    import time

    from chatbot import zerogpu

    backend = backend_for(CHATBOT_MODEL=str(tiny_llama_dir), CHATBOT_N_CTX="2048")
    original = backend.model.forward

    def slow(*args, **kwargs):  # 10 ms a token: 1500 tokens would take 15 s
        time.sleep(0.01)
        return original(*args, **kwargs)

    backend.model.forward = slow
    chunks = list(backend._reply_on_gpu(MESSAGES, GenerationParams(max_new_tokens=1500, temperature=1.0, top_p=1.0,
                                                                   min_p=0.0, seed=4), zerogpu.START_S + 1))
    assert chunks[-1].finish_reason == "length"
    assert sum(c.tokens for c in chunks) < 1500
    assert backend.kept is None  # nothing kept for a later call: it may land in another worker
