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
    # Llama-3.1-8B / Mistral-7B / Qwen2.5-7B keep a separate lm_head (untied): new token rows need it trained too.
    "tiny-llama-untied": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                              rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Architectures whose attention ignores packed position_ids (learned positions / ALiBi masks) or that mix
    # tokens outside attention (LFM2's short convolutions): packing must be refused for them.
    "tiny-opt": dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                     word_embed_proj_dim=64, max_position_embeddings=2048),
    "tiny-bloom": dict(model_type="bloom", hidden_size=64, n_layer=2, n_head=4),
    "tiny-mpt": dict(model_type="mpt", d_model=64, n_layers=2, n_heads=4, max_seq_len=2048),
    "tiny-lfm2": dict(model_type="lfm2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention"],
                      max_position_embeddings=2048, block_multiple_of=16),
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


# A few-hundred-kB copy of any architecture: every width a config may name, set small (names through the
# config's attribute_map, e.g. GPT-2's n_embd); keys a config does not have are left alone.
TINY_SIZES: dict[str, int] = {
    "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16, "intermediate_size": 128, "ffn_dim": 128,
    "n_inner": 128, "ffn_hidden_size": 128, "word_embed_proj_dim": 64, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "rotary_dim": 8, "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 16, "block_multiple_of": 16, "vocab_size": 128}


def tiny_copy(config):
    """The same architecture as `config` (its layer kinds, positions, masks, norms) at toy width: one layer of
    each kind (layer_types / GPT-Neo's attention_types, in order), two when there is one kind, a 128-token
    vocabulary. Raises whatever the config class raises when a width it derives does not fit."""
    d = config.to_dict()
    names = getattr(config, "attribute_map", {})
    for name, value in TINY_SIZES.items():
        key = names.get(name, name)
        if d.get(key) is not None:
            d[key] = value
    kv = names.get("num_key_value_heads", "num_key_value_heads")
    if d.get(kv) is not None:  # keep MQA / GQA / MHA as it is
        heads = getattr(config, "num_attention_heads", d[kv])
        d[kv] = 1 if d[kv] == 1 else 2 if d[kv] < heads else TINY_SIZES["num_attention_heads"]
    vocab = TINY_SIZES["vocab_size"]
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = d.get(key)
        if isinstance(value, int) and value >= vocab:
            d[key] = vocab - 1
        elif isinstance(value, list):
            d[key] = [v if v < vocab else vocab - 1 for v in value]
    layers = names.get("num_hidden_layers", "num_hidden_layers")
    if isinstance(d.get("layer_types"), list) and d["layer_types"]:
        kinds = list(dict.fromkeys(d["layer_types"]))
        d["layer_types"] = kinds if len(kinds) > 1 else kinds * 2
        d[layers] = len(d["layer_types"])
    elif isinstance(d.get("attention_types"), list):  # GPT-Neo: [[["global", "local"], 12]]
        kinds = list(dict.fromkeys(kind for group, _ in d["attention_types"] for kind in group))
        d["attention_types"], d[layers] = [[kinds, 1]], len(kinds)
        d.pop("attention_layers", None)  # derived from attention_types
    else:
        d[layers] = 2
    for key in ("full_attn_idxs", "quantization_config", "architectures", "auto_map"):
        d.pop(key, None)
    return type(config).from_dict(d)


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
