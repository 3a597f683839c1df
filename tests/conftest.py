"""Shared fixtures: the embedded SmolLM2 and tiny random-weight models. Nothing here touches the network."""
from __future__ import annotations

import os

# Tests never download: any code path that tries fails loudly instead of hanging on a closed network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF."""
    from chatbot.model_files import embedded_gguf_path

    return embedded_gguf_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory, smollm2_gguf):
    """The embedded model's real tokenizer (byte-level BPE, ChatML template) saved as an HF tokenizer dir."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok.save_pretrained(out)
    return out


def _tiny_model_dir(tmp_path_factory, shape, tokenizer_dir):
    from transformers import AutoTokenizer

    from training.trainer.shapes import build_tiny_checkpoint

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return build_tiny_checkpoint(shape, tok, tmp_path_factory.mktemp(shape))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """An HF checkpoint dir: Llama architecture, random weights, SmolLM2's tokenizer and chat template."""
    return _tiny_model_dir(tmp_path_factory, "tiny-llama", smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """An HF checkpoint dir: Qwen2 architecture, random weights, SmolLM2's tokenizer and chat template."""
    return _tiny_model_dir(tmp_path_factory, "tiny-qwen2", smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """An HF checkpoint dir: GPT-2 architecture (DialoGPT's), random weights, SmolLM2's tokenizer and template."""
    return _tiny_model_dir(tmp_path_factory, "tiny-gpt2", smollm2_tokenizer_dir)


def save_scaled_tiny_llama(out, tokenizer_dir, *, chat_template: bool = True):
    """tiny-llama with its (frozen, tied) embeddings scaled up 8x, saved with SmolLM2's tokenizer (its chat template
    dropped when `chat_template` is false). With the default 0.02 init, LoRA alone cannot move the logits of a
    64-wide random model more than ~1 nat (|h| is fixed by the final RMSNorm), so a loss could not fall clearly;
    real checkpoints have no such limit."""
    import torch
    from transformers import AutoTokenizer

    from training.trainer.shapes import build_random_model

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not chat_template:
        tok.chat_template = None
    model = build_random_model("tiny-llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def scaled_tiny_llama_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """tiny-llama whose loss LoRA can clearly move (see save_scaled_tiny_llama), with SmolLM2's chat template."""
    return save_scaled_tiny_llama(tmp_path_factory.mktemp("tiny-llama-scaled"), smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def scaled_tiny_llama_without_template_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """The same model with no chat template in its tokenizer: a recipe's template then adds tokens."""
    return save_scaled_tiny_llama(tmp_path_factory.mktemp("tiny-llama-no-template"), smollm2_tokenizer_dir,
                                  chat_template=False)
