"""Load the base model for LoRA training (QLoRA 4-bit / bf16 / fp32); training/merge.py merges the adapter.

A GGUF base (the Space's embedded SmolLM2, or any .gguf the user names) is dequantised by transformers and
written once as a normal HF checkpoint (`OUT/base/`), so every later step - 4-bit loading, merging, export -
treats it like any other base.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from training.config import LoraSection, ModelConfig


def resolve_base(model: ModelConfig) -> tuple[str, str | None]:
    """(directory or Hub id, gguf file name or None) for the configured base."""
    name, gguf = model.name_or_path, model.gguf_file
    if name == "embedded":
        from chatbot.model_files import embedded_gguf_path

        path = embedded_gguf_path()
        return str(path.parent), path.name
    if name.endswith(".gguf") and Path(name).is_file():
        return str(Path(name).resolve().parent), Path(name).name
    return name, gguf


def load_tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    source, gguf = resolve_base(model)
    return AutoTokenizer.from_pretrained(source, gguf_file=gguf, trust_remote_code=model.trust_remote_code)


def load_gguf_model(source: str | Path, gguf_file: str):
    """A GGUF model dequantised into transformers (fp32) as a plain model that trains and saves normally.

    `save_pretrained` (and Trainer) refuse a GGUF-loaded model, so a fresh model is built from its config,
    without the GGUF quantization marker, and given the dequantised state dict.
    """
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=False)
    fresh.tie_weights()
    return fresh


def materialize_gguf_base(model: ModelConfig, out_dir: Path, tokenizer) -> str:
    """A GGUF base as an HF checkpoint dir (fp32, reused if already there); other bases are returned unchanged."""
    source, gguf = resolve_base(model)
    if not gguf:
        return source
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return str(out_dir)
    fresh = load_gguf_model(source, gguf)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)  # atomic: a killed run never leaves a half-written base behind
    return str(out_dir)


def resolve_mode(mode: str) -> str:
    """auto -> qlora when CUDA and bitsandbytes are there, else fp32; an explicit mode that cannot run fails."""
    has_cuda = torch.cuda.is_available()
    try:
        import bitsandbytes  # noqa: F401
        has_bnb = True
    except Exception:  # bitsandbytes raises various errors on machines without CUDA
        has_bnb = False
    if mode == "auto":
        return "qlora" if has_cuda and has_bnb else "fp32"
    if mode == "qlora" and not (has_cuda and has_bnb):
        raise ValueError("model.mode='qlora' needs CUDA and bitsandbytes; use model.mode=bf16 or fp32 (or auto)")
    return mode


def local_device_map():
    """Each DDP process (accelerate launch / torchrun) puts its whole model on its own GPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return None


def load_model_for_training(base: str, model: ModelConfig, lora: LoraSection, mode: str, tokenizer,
                            new_token_ids: list[int] = ()):
    """The base with LoRA adapters attached, ready for Trainer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from training.packing import pick_attention

    kwargs = dict(trust_remote_code=model.trust_remote_code, device_map=local_device_map())
    attn = pick_attention(model.attn_implementation, "cuda" if torch.cuda.is_available() else "cpu", mode)
    if attn:
        kwargs["attn_implementation"] = attn
    if mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["dtype"] = torch.bfloat16
    else:
        kwargs["dtype"] = torch.bfloat16 if mode == "bf16" else torch.float32
    m = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if len(tokenizer) > m.get_input_embeddings().weight.shape[0]:
        m.resize_token_embeddings(len(tokenizer))
    m.config.pad_token_id = tokenizer.pad_token_id
    m.config.use_cache = False  # incompatible with gradient checkpointing; the merged model re-enables it
    # QLoRA skips peft's prepare_model_for_kbit_training: it upcasts every non-4-bit weight (embeddings, tied
    # lm_head, norms) to fp32, which doubles their memory and makes the logits fp32 - the bulk of naive QLoRA's
    # VRAM. Under bf16 autocast the bf16 weights train as well; LoRA weights stay fp32 (peft's adapter autocast).
    if model.gradient_checkpointing:
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph under checkpointing
    target = lora.target_modules
    peft_cfg = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias, task_type="CAUSAL_LM",
        target_modules="all-linear" if target in (["all-linear"], "all-linear") else list(target),
        # Rows of tokens the template/pad added are random: train just those rows of the embedding.
        trainable_token_indices=list(new_token_ids) or None)
    return get_peft_model(m, peft_cfg)
