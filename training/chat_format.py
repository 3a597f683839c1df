"""Conversations -> training tensors, through the model's own chat template. The ONE place that does this.

Training, held-out evaluation and serving must agree token for token, so the prompt is never written by hand:
every position comes from `tokenizer.apply_chat_template`, and the serving path
(`apply_chat_template(messages[:-1], add_generation_prompt=True)`) is exactly a prefix of what we train on.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100  # what transformers' loss ignores


class TemplateError(ValueError):
    """The recipe's chat template setting cannot work with this tokenizer; str() names what to change."""


def _ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=True)
    ids = out["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def _closing_token_ids(tokenizer) -> set[int]:
    """Tokens that can end an assistant turn: EOS and the tokenizer's other special tokens (<|im_end|>, <|eot_id|>)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        ids.discard(tokenizer.pad_token_id)
    return ids


def encode_conversation(tokenizer, messages: list[dict[str, Any]], max_length: int) -> dict[str, list[int]] | None:
    """input_ids / attention_mask / labels for one conversation; labels are -100 on every non-assistant token.

    Trained: each assistant reply's content and the end-of-turn token that closes it (so the model learns to stop);
    whatever the template puts after that token (ChatML's newline) is not. Returns None when the conversation has
    no assistant token left after cutting it to `max_length` - it would train on nothing. Raises ValueError when
    the template is not prefix-stable (rendering a conversation changes how its earlier turns tokenize).
    """
    full = _ids(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(full)
    closing = _closing_token_ids(tokenizer)
    last_closed = True
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = _ids(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _ids(tokenizer, messages[: i + 1])
        if full[: len(upto)] != upto or upto[: len(prompt)] != prompt:
            raise ValueError("chat template is not prefix-stable: turn %d renders differently inside the "
                             "conversation than on its own, so prompt and training tokens would differ" % i)
        end, last_closed = len(upto), False
        # Stop after the last special token of the turn (<|im_end|>, <|eot_id|>, </s>); trailing text is template glue.
        for j in range(len(upto) - 1, len(prompt) - 1, -1):
            if upto[j] in closing:
                end, last_closed = j + 1, True
                break
        labels[len(prompt):end] = full[len(prompt):end]
    if not last_closed and messages[-1].get("role") == "assistant" and tokenizer.eos_token_id is not None:
        # A template that closes turns with no special token: append EOS so the model still learns to stop.
        full, labels = full + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    full, labels = full[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}


def prompt_ids(tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """What serving feeds the model before it generates the next assistant turn."""
    return _ids(tokenizer, messages, add_generation_prompt=True)


# ---------------------------------------------------------------- tokenizer preparation

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
# Tokens that end an assistant turn in common chat templates, most common first. A template's turn closer becomes
# EOS (prepare_tokenizer); the GGUF export names one as the end-of-turn token, where llama.cpp stops.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "<|endofturn|>")


def _named_template(name: str) -> str:
    """The Jinja text of a recipe-named template: a .jinja file, a tokenizer dir whose template is borrowed, or a
    name: training/templates/NAME.jinja (chatml) or one of TRL's bundled templates (llama3_2, qwen2_5, ...)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path.read_text()
    if path.is_dir():
        from transformers import AutoTokenizer

        source = AutoTokenizer.from_pretrained(path)
        if not source.chat_template:
            raise TemplateError(f"model.chat_template={name!r}: that tokenizer has no chat template")
        return source.chat_template
    candidates = [TEMPLATE_DIR / f"{name}.jinja"]
    try:
        import trl

        candidates.append(Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja")
    except ImportError:
        pass
    for c in candidates:
        if c.is_file():
            return c.read_text()
    raise TemplateError(f"model.chat_template={name!r} is not accepted; use chatml, a .jinja file, a tokenizer dir "
                     "or a TRL template name (trl/chat_templates/*.jinja)")


def prepare_tokenizer(tokenizer, chat_template: str | None = None) -> list[int]:
    """Give `tokenizer` a chat template and a pad token different from EOS, in place.

    The recipe's template is used only when the base has none (it is then saved with the output tokenizer, so the
    Space renders prompts with the very same template). Returns the ids of tokens that had to be added: the model's
    embeddings must be resized for them and those rows trained.
    """
    added: list[int] = []
    if not tokenizer.chat_template:
        if not chat_template:
            raise TemplateError("the base model's tokenizer has no chat template: set model.chat_template "
                                "(chatml, a .jinja file or a tokenizer dir)")
        template = _named_template(chat_template)
        # Markers like <|im_start|> must be single special tokens, as in models trained with that template.
        markers = list(dict.fromkeys(re.findall(r"<\|[A-Za-z_]+\|>", template)))
        new = [t for t in markers if t not in tokenizer.get_vocab()]
        if new:
            tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
            added += tokenizer.convert_tokens_to_ids(new)
        tokenizer.chat_template = template
        closer = next((t for t in END_OF_TURN if t in markers), None)
        if closer:  # generation must stop where a turn ends
            tokenizer.eos_token = closer
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Reuse an existing non-EOS special token before growing the vocabulary.
        candidates = [tokenizer.unk_token, "<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "<|endoftext|>"]
        vocab = tokenizer.get_vocab()
        pad = next((t for t in candidates if t and t in vocab and vocab[t] != tokenizer.eos_token_id
                    and vocab[t] != tokenizer.bos_token_id), None)
        if pad is None:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            added.append(tokenizer.pad_token_id)
        else:
            tokenizer.pad_token = pad
    return added
