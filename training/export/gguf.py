"""Export a merged Hugging Face checkpoint to GGUF, offline: f16 first, then llama.cpp's own quantiser.

    python training/export_gguf.py --model RUN_DIR/merged --out DIR --quant q4_k_m q8_0 f16

The `gguf` package does the file format, tensor names and merges; llama-cpp-python's `llama_model_quantize`
does the quantisation, so nothing is cloned, compiled or downloaded. Written by hand here is only what no
library gives: the per-architecture tensor tweaks (Llama's q/k rope permutation, llama3 rope factors, GPT-2's
Conv1D transposes), the tokenizer -> GGUF vocab, and the metadata that makes llama.cpp format prompts and stop
like the HF model.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable, Sequence

from training.chat_format import END_OF_TURN

log = logging.getLogger(__name__)

# HF model_type -> gguf MODEL_ARCH member name. Mistral and TinyLlama are Llama to llama.cpp; DialoGPT is GPT-2.
ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "gpt2": "GPT2"}
# GPT-2's config.json keys under the names the rest of this file reads (transformers maps them the same way).
_GPT2_KEYS = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
              "n_positions": "max_position_embeddings", "n_inner": "intermediate_size"}
# GPT-2 stores these as Conv1D weights, (in, out): llama.cpp wants (out, in) like every nn.Linear.
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Written by the Python writer itself; everything else is quantised from the f16 file by llama.cpp.
FLOAT_TYPES = ("f32", "f16", "bf16")
# llama.cpp quantisation types that need no importance matrix (IQ* types do, so they are not offered).
LLAMA_QUANTS = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1",
                "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")
QUANTS = FLOAT_TYPES + LLAMA_QUANTS

# llama.cpp's convert_hf_to_gguf.py names the BPE pre-tokenizer by hashing the tokenizer's ids on this
# fixed string; the same hashes here give the same `tokenizer.ggml.pre` for the known tokenizers.
_CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
           "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作"
           "1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's "
           "there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
_CHKHSH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama-3.x
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / 2 / 2.5
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
}
# Pre-tokenizer split regexes (tokenizer.json) of the same families.
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
_EOM_NAMES = ("<|eom_id|>",)


class ExportError(ValueError):
    """Bad input to the export, with one message that says what to do."""


# ---------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------

def _weight_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("adapter_model"))


def _check_inputs(model_dir: Path, quants: Sequence[str]) -> tuple[dict, list[str]]:
    """Everything that can be wrong with the input, found before any work: (config, normalised quant names)."""
    if isinstance(quants, str):
        quants = [quants]
    names = [str(q).lower() for q in quants]
    bad = [q for q in names if q not in QUANTS]
    if not names:
        raise ExportError(f"quant: none asked for; name one or more of: {', '.join(QUANTS)}")
    if bad:
        raise ExportError(f"quant: unknown {', '.join(map(repr, bad))}; accepted: {', '.join(QUANTS)}")
    if not model_dir.is_dir():
        raise ExportError(f"model_dir: {str(model_dir)!r} is not a directory")
    if (model_dir / "adapter_config.json").is_file() and not _weight_files(model_dir):
        raise ExportError(
            f"model_dir: {str(model_dir)!r} is a LoRA adapter, not a merged model; merge it first: "
            "`python training/finetune.py ...` writes OUT/merged next to the adapter, or in Python "
            "PeftModel.from_pretrained(base, ADAPTER_DIR).merge_and_unload().save_pretrained(OUT) "
            "and save the tokenizer there too")
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"model_dir: {str(model_dir)!r} has no config.json; expected a merged HF checkpoint "
                          "(config.json, *.safetensors, tokenizer files)")
    config = json.loads((model_dir / "config.json").read_text())
    config = {**config.get("text_config", {}), **config}
    if config.get("model_type") == "gpt2":
        config.update({new: config[old] for old, new in _GPT2_KEYS.items() if config.get(old) is not None})
        config.setdefault("intermediate_size", 4 * config["hidden_size"])
        config.setdefault("tie_word_embeddings", True)  # GPT-2's default, often left out of config.json
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ExportError(
            f"model_type: {model_type!r} is not supported for GGUF export (accepted: {', '.join(ARCHITECTURES)}); "
            "serve it with CHATBOT_BACKEND=transformers instead")
    if not _weight_files(model_dir):
        found = "pytorch_model.bin weights (re-save with save_pretrained(safe_serialization=True))" if any(
            model_dir.glob("*.bin")) else "no weights"
        raise ExportError(f"model_dir: {str(model_dir)!r} has {found}; expected *.safetensors")
    if not ((model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer.model").is_file()):
        raise ExportError(f"model_dir: {str(model_dir)!r} has no tokenizer (tokenizer.json or tokenizer.model); "
                          "save the tokenizer next to the weights (tokenizer.save_pretrained(model_dir))")
    return config, names


# ---------------------------------------------------------------------------------------------------
# Hyper-parameters
# ---------------------------------------------------------------------------------------------------

def _rope(config: dict) -> dict:
    """Rope settings from either transformers 5 `rope_parameters` or the older rope_theta + rope_scaling."""
    params = dict(config.get("rope_parameters") or {})
    params.update({k: v for k, v in (config.get("rope_scaling") or {}).items() if k not in params})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    return params


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _llama3_rope_factors(config: dict) -> "Any":
    """Per-frequency rope scale factors for rope_type llama3 (llama.cpp takes them as the rope_freqs tensor)."""
    import numpy as np

    rope, dim = _rope(config), _head_dim(config)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _add_hparams(writer, config: dict, n_vocab: int) -> None:
    import gguf

    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_vocab_size(n_vocab)
    if config["model_type"] == "gpt2":  # learned absolute positions and LayerNorm: no rope, no RMS norm
        writer.add_layer_norm_eps(config["layer_norm_epsilon"])
        return
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if "original_max_position_embeddings" in rope:
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3"):  # llama3 is carried by the rope_freqs tensor instead
        raise ExportError(f"rope_type: {kind!r} has no llama.cpp equivalent (accepted: default, linear, yarn, llama3); "
                          "serve this model with CHATBOT_BACKEND=transformers")


def _add_provenance(writer, model_dir: Path, name: str, metadata: dict | None) -> None:
    """general.* keys: what the model is and where it came from (base model, adapter, data sets)."""
    # "base_model" and "general.base_model" both accepted: callers think in GGUF key names or plain ones.
    meta = {str(k).removeprefix("general."): v for k, v in (metadata or {}).items()}
    writer.add_type("model")
    writer.add_name(str(meta.pop("name", None) or name))
    base = meta.pop("base_model", None)
    if base:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, str(base))
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(base)):
            writer.add_base_model_repo_url(0, f"https://huggingface.co/{base}")
    adapter = meta.pop("adapter", None)
    if adapter:
        writer.add_string("general.adapter", str(adapter))
    datasets = meta.pop("datasets", None) or meta.pop("dataset", None) or []
    if isinstance(datasets, (str, os.PathLike)):
        datasets = [datasets]
    if datasets:
        writer.add_dataset_count(len(datasets))
        for i, ds in enumerate(datasets):
            writer.add_dataset_name(i, str(ds))
            if re.fullmatch(r"[\w.-]+/[\w.-]+", str(ds)):
                writer.add_dataset_repo_url(i, f"https://huggingface.co/datasets/{ds}")
    for key, value in meta.items():  # anything else (license, description, version …) as general.<key>
        if value is None:
            continue
        if isinstance(value, bool):
            writer.add_bool(f"general.{key}", value)
        elif isinstance(value, (list, tuple)):
            writer.add_array(f"general.{key}", [str(v) for v in value])
        else:
            writer.add_string(f"general.{key}", str(value))


# ---------------------------------------------------------------------------------------------------
# Tokenizer -> GGUF vocab
# ---------------------------------------------------------------------------------------------------

def _pre_tokenizer(tok, tokenizer_json: dict) -> str:
    """The llama.cpp pre-tokenizer name for a byte-level BPE tokenizer.

    First from the tokenizer.json pre_tokenizer itself (the split regex / digit splitting), since that is
    what the HF tokenizer really does; then llama.cpp's own test, a hash of the ids of a fixed string, for
    other known families. The hash alone can mislead: a tokenizer rebuilt without SmolLM's digit splitting
    hashes like SmolLM's but splits " 99" differently.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [s.get("type") for s in steps]
    patterns = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    digits = any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps)
    byte_regex = any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps)
    if patterns == [_LLAMA3_RE] and set(types) <= {"Split", "ByteLevel"} and not byte_regex:
        return "llama-bpe"
    if patterns == [_QWEN2_RE] and set(types) <= {"Split", "ByteLevel"} and not byte_regex:
        return "qwen2"
    if not patterns and byte_regex and set(types) <= {"ByteLevel", "Digits"}:
        return "smollm" if digits else "gpt-2"
    chkhsh = sha256(str(tok.encode(_CHKTXT, add_special_tokens=False)).encode()).hexdigest()
    if chkhsh in _CHKHSH:
        return _CHKHSH[chkhsh]
    log.warning("unrecognised BPE pre-tokenizer (steps %s, hash %s); writing 'default', so llama.cpp may split "
                "text differently from the HF tokenizer", types, chkhsh)
    return "default"


def _tokenizer_kind(tokenizer_json: dict, model_dir: Path) -> str:
    model = tokenizer_json.get("model", {})
    decoder = tokenizer_json.get("decoder") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback") and (
            decoder.get("type") == "ByteLevel" or "ByteLevel" in json.dumps(tokenizer_json.get("pre_tokenizer"))):
        return "gpt2"
    if (model_dir / "tokenizer.model").is_file() or (model.get("type") == "BPE" and model.get("byte_fallback")):
        return "llama"
    raise ExportError(f"tokenizer: model type {model.get('type')!r} is not supported for GGUF export "
                      "(accepted: byte-level BPE, SentencePiece BPE); serve it with CHATBOT_BACKEND=transformers")


def _spm_pieces(tok, model_dir: Path, tokenizer_json: dict, n_vocab: int):
    """(tokens, scores, types) of a SentencePiece vocab: from tokenizer.model when present (exact scores),
    else from tokenizer.json, scoring each token by the rank of the merge that makes it, which is the
    order SentencePiece BPE merges in."""
    import gguf

    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    sp_file = model_dir / "tokenizer.model"
    if sp_file.is_file():
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor(model_file=str(sp_file))
        for i in range(min(sp.vocab_size(), n_vocab)):
            tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
            types[i] = int(gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                           else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                           else gguf.TokenType.NORMAL)
    else:
        model = tokenizer_json["model"]
        merges = model.get("merges") or []
        rank = {}
        for r, m in enumerate(merges):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            rank.setdefault(a + b, r)
        for piece, i in model["vocab"].items():
            if i >= n_vocab:
                continue
            tokens[i] = piece
            scores[i] = -float(rank[piece]) if piece in rank else -float(len(merges) + i)
            types[i] = int(gguf.TokenType.BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece)
                           else gguf.TokenType.UNKNOWN if piece == model.get("unk_token") else gguf.TokenType.NORMAL)
    for i, added in tok.added_tokens_decoder.items():
        if i < n_vocab:
            tokens[i] = added.content
            types[i] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
            if not sp_file.is_file():
                scores[i] = 0.0
    return tokens, scores, types


def _bpe_tokens(tok, n_vocab: int):
    """(tokens, types) of a byte-level BPE vocab, padded to the model's embedding rows."""
    import gguf

    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            # llama.cpp matches added tokens as plain text, not byte-encoded like the BPE pieces.
            tokens.append(added[i].content)
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(reverse[i])
            types.append(int(gguf.TokenType.NORMAL))
    return tokens, types


def _turn_end_token(tok) -> int | None:
    """The special token the chat template puts right after an assistant message (ChatML's <|im_end|>,
    Llama-3's <|eot_id|> …), found by rendering a one-turn conversation and reading what follows the reply."""
    if not isinstance(tok.chat_template, str):
        return None
    marker = "Zq7x"
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                       tokenize=False, add_generation_prompt=False)
    except Exception as exc:  # a template that cannot render a plain turn: fall back to the known names
        log.warning("could not render the chat template to find the end-of-turn token: %s", exc)
        return None
    rest = text[text.rfind(marker) + len(marker):].lstrip(" ")
    matches = [(len(a.content), i) for i, a in tok.added_tokens_decoder.items()
               if a.special and a.content and rest.startswith(a.content)]
    return max(matches)[1] if matches else None


def _add_vocab(writer, model_dir: Path, config: dict) -> dict:
    """Tokens, merges/scores, special ids, add_bos/eos, end-of-turn ids and the chat template."""
    import gguf
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise ExportError(f"tokenizer: could not load the tokenizer in {str(model_dir)!r}: {exc}") from exc
    tokenizer_json = {}
    if (model_dir / "tokenizer.json").is_file():
        tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    n_vocab = int(config.get("vocab_size") or len(tok))
    if len(tok) > n_vocab:
        raise ExportError(f"tokenizer: {len(tok)} tokens but the model has only {n_vocab} embedding rows")
    kind = _tokenizer_kind(tokenizer_json, model_dir)
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        tokens, types = _bpe_tokens(tok, n_vocab)
        writer.add_tokenizer_pre(_pre_tokenizer(tok, tokenizer_json))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    else:
        tokens, scores, types = _spm_pieces(tok, model_dir, tokenizer_json, n_vocab)
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        first = tok.convert_ids_to_tokens(tok.encode("a", add_special_tokens=False))
        writer.add_add_space_prefix(bool(first) and first[0].startswith("\u2581"))

    # gguf's SpecialVocab reads the merges (either tokenizer.json format); the ids and flags come from the
    # loaded HF tokenizer, which is what training used, rather than from re-parsing its config files.
    special = gguf.SpecialVocab(model_dir, load_merges=kind == "gpt2", n_vocab=n_vocab)
    special.special_token_ids = {}
    for typ in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{typ}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            special.special_token_ids[typ] = tid
    with_special = tok.encode("a", add_special_tokens=True)
    without = tok.encode("a", add_special_tokens=False)
    special.add_special_token = {
        "bos": tok.bos_token_id is not None and len(with_special) > len(without) and with_special[0] == tok.bos_token_id,
        "eos": tok.eos_token_id is not None and len(with_special) > len(without) and with_special[-1] == tok.eos_token_id,
    }
    special.chat_template = tok.chat_template if isinstance(tok.chat_template, str) else None
    if special.chat_template is None:
        log.warning("no chat template in %s: llama.cpp will guess a prompt format", model_dir)
    special.add_to_gguf(writer, quiet=True)

    vocab = tok.get_vocab()
    eot = _turn_end_token(tok)
    if eot is None:
        eot = next((vocab[t] for t in END_OF_TURN if t in vocab), None)
    if eot is not None:
        writer.add_eot_token_id(eot)
    eom = next((vocab[t] for t in _EOM_NAMES if t in vocab), None)
    if eom is not None:
        writer.add_eom_token_id(eom)
    return {"kind": kind, "eot": eot, "eom": eom, **special.special_token_ids,
            "add_bos": special.add_special_token["bos"]}


# ---------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------

def _permute_qk(w, n_head: int):
    """HF stores Llama's q/k rows in rotate-half order; llama.cpp's LLAMA rope wants them interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_plan(model_dir: Path, config: dict, arch) -> list[tuple[str, Path, str, tuple[int, ...]]]:
    """(gguf name, file, hf name, shape) for every tensor to write, in file order, without loading any."""
    import gguf
    from safetensors import safe_open

    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings", False)
    plan = []
    for path in _weight_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for hf_name in f.keys():
                if hf_name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")) or \
                        (tied and hf_name == "lm_head.weight"):
                    continue  # recomputed by llama.cpp (rope, GPT-2's causal mask) / the same matrix as the embedding
                gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ExportError(f"tensor {hf_name!r} in {path.name} has no GGUF name for "
                                      f"{config['model_type']}; serve this model with CHATBOT_BACKEND=transformers")
                shape = tuple(f.get_slice(hf_name).get_shape())
                plan.append((gguf_name, path, hf_name, shape[::-1] if _is_conv1d(config, hf_name) else shape))
    return plan


def _is_conv1d(config: dict, hf_name: str) -> bool:
    return config["model_type"] == "gpt2" and hf_name.endswith(_CONV1D)


def _write_float_gguf(model_dir: Path, config: dict, path: Path, ftype: str, name: str, metadata: dict | None,
                      progress: bool) -> dict:
    """One f32/f16/bf16 GGUF, tensors streamed: each is read from safetensors only when the writer reaches it."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[config["model_type"]])
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    _add_provenance(writer, model_dir, name, metadata)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[ftype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    plan = _tensor_plan(model_dir, config, arch)
    n_vocab = next((shape[0] for g, _, _, shape in plan if g == "token_embd.weight"), config.get("vocab_size"))
    _add_hparams(writer, config, n_vocab)
    vocab_info = _add_vocab(writer, model_dir, {**config, "vocab_size": n_vocab})

    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    permute = config["model_type"] in ("llama", "mistral")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan) + (_rope(config)["rope_type"] == "llama3"), unit="tensor", desc=f"{path.name}")

    def loader(gguf_name: str, file: Path, hf_name: str) -> Callable[[], Any]:
        def load():
            with safe_open(file, framework="pt") as f:  # opened per tensor so its mapping is dropped after
                t = f.get_tensor(hf_name)
            if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                t = _permute_qk(t, n_head)
            elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                t = _permute_qk(t, n_kv)
            elif _is_conv1d(config, hf_name):
                t = t.T
            arr = _to_numpy(t, ftype if t.ndim > 1 else "f32")
            if bar is not None:
                bar.set_postfix_str(gguf_name, refresh=False)
                bar.update(1)
            return arr
        return load

    def _to_numpy(t, kind: str):
        if kind == "bf16":  # numpy has no bfloat16: hand the writer the raw 16-bit words
            return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        return t.to(torch.float16 if kind == "f16" else torch.float32).contiguous().numpy()

    np_dtypes = {"f32": np.float32, "f16": np.float16, "bf16": np.int16}
    for gguf_name, file, hf_name, shape in plan:
        kind = ftype if len(shape) > 1 else "f32"  # llama.cpp keeps norms and biases in f32
        meta = gguf.LazyNumpyTensor.meta_with_dtype_and_shape(np_dtypes[kind], shape)
        lazy = gguf.LazyNumpyTensor(meta=meta, func=loader(gguf_name, file, hf_name))
        writer.add_tensor(gguf_name, lazy, raw_dtype=gguf.GGMLQuantizationType.BF16 if kind == "bf16" else None)
    if _rope(config)["rope_type"] == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(config))
        if bar is not None:
            bar.update(1)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    return vocab_info


# ---------------------------------------------------------------------------------------------------
# Quantisation (llama.cpp's own, through llama-cpp-python)
# ---------------------------------------------------------------------------------------------------

_QUANT_LINE = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")


def _quantize(src: Path, dst: Path, quant: str, threads: int | None, progress: bool) -> None:
    """llama.cpp's quantiser; its per-tensor log lines drive a progress bar instead of flooding stderr."""
    import ctypes

    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}", None)
    if ftype is None:
        raise ExportError(f"quant: {quant!r} is not available in this llama-cpp-python build; "
                          f"accepted: {', '.join(QUANTS)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    bar, errors = None, []
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="tensor", desc=dst.name)

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user_data) -> None:
        if level == 3:  # GGML_LOG_LEVEL_ERROR
            errors.append(text.decode("utf-8", "replace").strip())
        m = _QUANT_LINE.search(text or b"")
        if m and bar is not None:
            bar.total = int(m.group(2))
            bar.set_postfix_str(m.group(3).decode(), refresh=False)
            bar.update(int(m.group(1)) - bar.n)

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    finally:
        from llama_cpp import _logger  # llama-cpp-python's own handler, put back for later Llama() calls

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        if bar is not None:
            bar.close()
    if rc != 0:
        dst.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src.name} -> {quant}) failed with code {rc}: {' '.join(errors)}")


def export_gguf(model_dir, out_dir, quants: Sequence[str] = ("q4_k_m",), metadata: dict | None = None, *,
                name: str = "model", threads: int | None = None, progress: bool = True) -> list[Path]:
    """Export a merged HF checkpoint dir to `<out_dir>/<name>-<quant>.gguf`, one file per quant.

    metadata: provenance written into general.* keys: name, base_model, adapter, datasets (+ any other
    key as general.<key>; a leading "general." is accepted).
    Float types are written directly; the rest are quantised by llama.cpp from an f16 file, which is kept
    only when "f16" is among `quants`. Returns the written paths in the order of `quants`.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config, names = _check_inputs(model_dir, quants)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {q: out_dir / f"{name}-{q}.gguf" for q in dict.fromkeys(names)}
    for q in outputs:
        if q in FLOAT_TYPES:
            _write_float_gguf(model_dir, config, outputs[q], q, name, metadata, progress)
    to_quantize = [q for q in outputs if q not in FLOAT_TYPES]
    if to_quantize:
        base = outputs.get("f16") or out_dir / f".{name}-f16.tmp.gguf"
        try:
            if not base.is_file():
                _write_float_gguf(model_dir, config, base, "f16", name, metadata, progress)
            for q in to_quantize:
                _quantize(base, outputs[q], q, threads, progress)
        finally:
            if "f16" not in outputs:
                base.unlink(missing_ok=True)
    return list(outputs.values())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="merged HF checkpoint dir (e.g. RUN_DIR/merged)")
    parser.add_argument("--out", required=True, help="output dir for <name>-<quant>.gguf files")
    parser.add_argument("--quant", nargs="+", default=["q4_k_m"], help=f"one or more of: {', '.join(QUANTS)}")
    parser.add_argument("--name", default="model", help="file name prefix and general.name (default: model)")
    parser.add_argument("--base-model", help="provenance: the base model id")
    parser.add_argument("--adapter", help="provenance: the LoRA adapter dir or repo id that was merged")
    parser.add_argument("--dataset", nargs="*", default=[], help="provenance: training data set ids")
    parser.add_argument("--threads", type=int, help="quantisation threads (default: all cores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    metadata = {"base_model": args.base_model, "adapter": args.adapter, "datasets": args.dataset}
    try:
        paths = export_gguf(args.model, args.out, args.quant, metadata, name=args.name, threads=args.threads)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"{p}\t{p.stat().st_size / 2**20:.1f} MiB")
    return 0
