"""Named model shapes with random weights: tiny ones for tests, real ones for throughput benchmarks.

Each shape is the config of a real model family (same architecture and proportions), so a model built
from it exercises the same code paths as the real checkpoint without downloading anything.
"""
from __future__ import annotations

from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    # Tests: a few MB, still the real architecture end to end.
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    # Tests of the GPT-Neo and DialoGPT (GPT-2) recipes: base models with no chat template.
    "tiny-gpt-neo": dict(model_type="gpt_neo", hidden_size=64, num_layers=2, num_heads=4,
                         attention_types=[[["global", "local"], 1]], window_size=64, max_position_embeddings=2048),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=1024),
    # Benchmarks: the real models' shapes.
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "llama-3.2-3b": dict(model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                         num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
}


def shape_config(name: str, **overrides: Any):
    """A transformers config for a named shape; overrides (vocab_size, token ids, …) win."""
    from transformers import AutoConfig

    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; accepted: {', '.join(SHAPES)}")
    kwargs = {**SHAPES[name], **overrides}
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def build_random_model(name: str, seed: int = 0, **overrides: Any):
    """A causal LM of the named shape with seeded random weights (fp32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(shape_config(name, **overrides))


def build_tiny_checkpoint(name: str, tokenizer, out_dir, seed: int = 0):
    """Save a random model of the named shape sized to `tokenizer`, plus the tokenizer, as an HF dir."""
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = build_random_model(name, seed=seed, **{k: v for k, v in ids.items() if v is not None})
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
