"""Masking and template agreement: what we train on is exactly what serving renders, loss only on replies."""
from __future__ import annotations

import pytest

from training.chat_format import IGNORE_INDEX, encode_conversation, prepare_tokenizer, prompt_ids

SINGLE = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]
MULTI = [
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven is prime."},
    {"role": "user", "content": "And an even one?"},
    {"role": "assistant", "content": "Two, the only even prime."},
]


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    assert prepare_tokenizer(t) == []  # SmolLM2 has its template and a spare special token for padding
    return t


def _as_list(ids):
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def _runs(labels):
    """Contiguous (start, end) spans of trained positions."""
    runs, start = [], None
    for i, x in enumerate(labels + [IGNORE_INDEX]):
        if x != IGNORE_INDEX and start is None:
            start = i
        elif x == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _reply_tokens(tok, text):
    return tok.encode(text, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]


def test_pad_is_not_eos(tok):
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.eos_token == "<|im_end|>"


def test_single_turn_labels_only_on_reply_and_its_end_token(tok):
    ex = encode_conversation(tok, SINGLE, max_length=512)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) == len(ex["attention_mask"])
    prompt = _as_list(tok.apply_chat_template(SINGLE[:-1], add_generation_prompt=True))
    reply = _reply_tokens(tok, "Paris.")
    assert _runs(labels) == [(len(prompt), len(prompt) + len(reply))]
    assert labels[len(prompt): len(prompt) + len(reply)] == reply
    assert ids[: len(prompt)] == prompt
    # Everything else (system, user, role headers, the newline after <|im_end|>) is masked.
    assert sum(x != IGNORE_INDEX for x in labels) == len(reply)


def test_multi_turn_trains_every_reply_and_nothing_else(tok):
    ex = encode_conversation(tok, MULTI, max_length=512)
    labels = ex["labels"]
    runs = _runs(labels)
    assert len(runs) == 2
    for (start, end), msg_index in zip(runs, (1, 3)):
        prompt = _as_list(tok.apply_chat_template(MULTI[:msg_index], add_generation_prompt=True))
        assert start == len(prompt)
        assert labels[start:end] == _reply_tokens(tok, MULTI[msg_index]["content"])
    user_tokens = tok.encode("And an even one?", add_special_tokens=False)
    text_ids = ex["input_ids"]
    pos = next(i for i in range(len(text_ids)) if text_ids[i:i + len(user_tokens)] == user_tokens)
    assert all(x == IGNORE_INDEX for x in labels[pos:pos + len(user_tokens)])


def test_truncation_keeps_partial_reply_and_drops_reply_less_rows(tok):
    prompt_len = len(prompt_ids(tok, SINGLE[:-1]))
    cut = encode_conversation(tok, SINGLE, max_length=prompt_len + 1)
    assert len(cut["input_ids"]) == prompt_len + 1
    assert sum(x != IGNORE_INDEX for x in cut["labels"]) == 1
    assert encode_conversation(tok, SINGLE, max_length=prompt_len) is None  # every reply token cut off
    assert encode_conversation(tok, SINGLE[:-1], max_length=512) is None   # no reply at all


def test_training_prompt_equals_serving_prompt(tok, tmp_path):
    """The transformers backend serves with apply_chat_template(history, add_generation_prompt=True) from the
    saved (merged) tokenizer: those ids must be exactly the ids we trained in front of the reply."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    served = AutoTokenizer.from_pretrained(tmp_path)
    for conv in (SINGLE, MULTI):
        ex = encode_conversation(tok, conv, max_length=512)
        first_trained = _runs(ex["labels"])[-1][0]
        serving = _as_list(served.apply_chat_template(conv[:-1], add_generation_prompt=True))
        assert ex["input_ids"][:first_trained] == serving


def test_training_prompt_equals_llama_cpp_prompt(tok, smollm2_gguf):
    """The GGUF backend: llama.cpp renders the GGUF's own template; capture the prompt tokens it would generate
    from (vocab only, no weights loaded)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(smollm2_gguf), vocab_only=True, verbose=False)
    captured = {}

    class Captured(Exception):
        pass

    def capture(prompt, **kwargs):
        captured["prompt"] = list(prompt)
        raise Captured

    llm.create_completion = capture
    for conv in (SINGLE, MULTI):
        with pytest.raises(Captured):
            llm.create_chat_completion(messages=conv[:-1])
        ex = encode_conversation(tok, conv, max_length=512)
        first_trained = _runs(ex["labels"])[-1][0]
        assert ex["input_ids"][:first_trained] == captured["prompt"]


def test_named_template_for_a_base_without_one(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "src")
    bare = AutoTokenizer.from_pretrained(tmp_path / "src")
    bare.chat_template = None
    with pytest.raises(ValueError, match="model.chat_template"):
        prepare_tokenizer(bare)
    with pytest.raises(ValueError, match=r"model.chat_template='alpaca-ish'.*chatml"):
        prepare_tokenizer(bare, "alpaca-ish")
    added = prepare_tokenizer(bare, "chatml")
    assert added == []  # SmolLM2 already has <|im_start|> / <|im_end|>
    assert bare.eos_token == "<|im_end|>"
    bare.save_pretrained(tmp_path / "out")
    again = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert again.chat_template == bare.chat_template  # saved with the output tokenizer
    ex = encode_conversation(again, SINGLE, max_length=512)
    trained = [x for x in ex["labels"] if x != IGNORE_INDEX]
    assert trained == _reply_tokens(tok, "Paris.")


def test_template_without_end_token_gets_eos_appended(tok, tmp_path):
    """A plain-text template closes no turn with a special token: EOS is appended and trained, so the model
    still learns to stop."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "src")
    t = AutoTokenizer.from_pretrained(tmp_path / "src")
    t.chat_template = None
    jinja = tmp_path / "plain.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant:{% endif %}")
    prepare_tokenizer(t, str(jinja))
    ex = encode_conversation(t, SINGLE, max_length=512)
    assert ex["input_ids"][-1] == t.eos_token_id and ex["labels"][-1] == t.eos_token_id
    assert t.decode([x for x in ex["labels"] if x != IGNORE_INDEX]).strip().startswith("Paris.")
