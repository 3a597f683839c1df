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


CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_small_vocab_llama(out, words, *, chat_template: bool = True):
    """tiny-llama over a word-level vocabulary of `words` (lower-cased, split at whitespace and punctuation; anything
    else is <unk>), with ChatML's markers already in it when `chat_template`. A 49k-token vocabulary makes a
    DPO/KTO step of a 64-wide model cost seconds on CPU (log-probabilities over the whole vocabulary); this one
    makes it milliseconds, for tests about what a run does rather than what a real tokenizer does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from training.trainer.shapes import build_random_model

    special = ["<unk>", "<pad>", "</s>"] + (["<|im_start|>", "<|im_end|>"] if chat_template else [])
    vocab = {w: i for i, w in enumerate(dict.fromkeys(special + ["system", "user", "assistant"]
                                                      + [w.lower() for w in words]))}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    wl.normalizer = normalizers.Lowercase()
    wl.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="<unk>", pad_token="<pad>",
                                  eos_token="<|im_end|>" if chat_template else "</s>")
    if chat_template:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML
    build_random_model("tiny-llama", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def small_vocab_llama_dir(tmp_path_factory):
    """tiny-llama with a ChatML template over a ~60-word vocabulary: the words of the tests' synthetic rows."""
    words = ("tell me about sure no i refuse number nice are is the a . , : ! ? ( ) # apples rivers clocks stars "
             "bread rain chess trains maps boats lamps tea topic").split() + [str(i) for i in range(100)]
    return save_small_vocab_llama(tmp_path_factory.mktemp("small-vocab-llama"), words)
