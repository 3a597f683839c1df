"""Merge a LoRA adapter into its full-precision base, one tensor at a time, and save the merged model.

Loading the whole base in fp32 to call peft's merge_and_unload needs 4 bytes per parameter (~13 GB for
Llama-3.2-3B), more than a free Colab's ~12.7 GB of RAM. Here each base tensor is read from its safetensors file,
gets W + scale * B @ A in fp32 when LoRA targets it (and its trained token rows), is cast to the output dtype and
written to the current output shard, so peak RAM is about one shard plus one tensor
(benchmarks/bench_merge.py measures it against the in-memory merge). Adapters this does not cover (DoRA, saved
full modules, LoRA on embeddings, per-layer rank patterns) and non-safetensors bases use peft's merge instead.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MAX_SHARD_BYTES = 1 << 30  # RAM held at once for the output; HF loaders read any number of shards
ADAPTER_PREFIX = "base_model.model."
TOKEN_DELTA = ".token_adapter.trainable_tokens_delta"
SAVED_EMBEDDING = ".token_adapter.base_layer.weight"  # peft saves a resized embedding (and lm_head) whole
# adapter_config.json keys that do not change what merging computes (init schemes, targeting, bookkeeping); any other
# key with a value (a LoRA variant this file does not know) leaves the merge to peft.
KNOWN_OPTIONS = {"base_model_name_or_path", "revision", "task_type", "peft_type", "peft_version", "auto_mapping",
                 "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
                 "layers_to_transform", "layers_pattern", "fan_in_fan_out", "bias", "use_rslora", "init_lora_weights",
                 "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_config", "megatron_core",
                 "trainable_token_indices", "ensure_weight_tying", "qalora_group_size", "use_dora", "modules_to_save",
                 "lora_bias", "rank_pattern", "alpha_pattern", "layer_replication"}
VOCAB_TENSORS = ("embed_tokens", "wte", "lm_head")  # a row per token: Llama/Qwen2/Mistral, GPT-2/GPT-Neo, output


# ---------------------------------------------------------------- what the adapter changes

def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, list[tuple]], str | None]:
    """({base tensor name: [changes, in the order peft applies them]}, None), or ({}, why peft's own merge must do
    it). A change is ("full", tensor): a resized embedding peft saved whole; ("lora", A, B, scale, transpose);
    ("rows", indices, values): trained token rows."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights_file = adapter_dir / "adapter_model.safetensors"
    checks = [(config.get("peft_type") != "LORA", f"peft_type {config.get('peft_type')}"),
              (bool(config.get("use_dora")), "DoRA"), (bool(config.get("modules_to_save")), "modules_to_save"),
              (config.get("bias", "none") != "none" or bool(config.get("lora_bias")), "trained biases"),
              (bool(config.get("rank_pattern") or config.get("alpha_pattern")), "rank/alpha patterns"),
              (bool(config.get("layer_replication")), "layer replication"),
              (not weights_file.is_file(), "no adapter_model.safetensors")]
    reasons = [why for bad, why in checks if bad]
    reasons += [f"adapter option {k}" for k, v in config.items() if v and k not in KNOWN_OPTIONS]
    if reasons:
        return {}, ", ".join(reasons)
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    token_indices = config.get("trainable_token_indices")
    state = load_file(str(weights_file))
    changes: dict[str, list[tuple]] = {}
    for key, value in state.items():
        name = key[len(ADAPTER_PREFIX):] if key.startswith(ADAPTER_PREFIX) else key
        if name.endswith(".lora_B.weight"):
            continue
        if name.endswith(".lora_A.weight"):
            module = name[: -len(".lora_A.weight")]
            b = state.get(f"{key[: -len('.lora_A.weight')]}.lora_B.weight")
            if b is None:
                return {}, f"{module} has lora_A but no lora_B"
            change = ("lora", value, b, scale, bool(config.get("fan_in_fan_out")))
        elif name.endswith(TOKEN_DELTA):
            module = name[: -len(TOKEN_DELTA)]
            indices = token_indices if isinstance(token_indices, list) else \
                next((v for k, v in (token_indices or {}).items() if module == k or module.endswith("." + k)), None)
            if indices is None or len(indices) != value.shape[0]:
                return {}, f"trainable token rows of {module} without matching trainable_token_indices"
            change = ("rows", list(indices), value)
        elif name.endswith(SAVED_EMBEDDING):
            module = name[: -len(SAVED_EMBEDDING)]
            change = ("full", value)
        else:
            return {}, f"adapter tensor {key}"
        changes.setdefault(f"{module}.weight", []).append(change)
    order = {"full": 0, "lora": 1, "rows": 2}
    return {k: sorted(v, key=lambda c: order[c[0]]) for k, v in changes.items()}, None


def apply_change(weight: torch.Tensor, change: tuple) -> torch.Tensor:
    """The merged fp32 tensor, computed as peft's merge computes it (LoRA: W + (B @ A) * scale; rows: index_copy)."""
    if change[0] == "full":
        return change[1].float()
    weight = weight.float()
    if change[0] == "lora":
        _, a, b, scale, transpose = change
        delta = (b.float() @ a.float()) * scale
        return weight + (delta.T if transpose else delta)
    _, indices, values = change
    return weight.index_copy(0, torch.tensor(indices), values.float())


# ---------------------------------------------------------------- reading and writing tensors

def base_checkpoint_dir(base: str) -> Path | None:
    """A local dir holding the base's config.json and *.safetensors: `base` itself, or its Hub snapshot in the cache
    (training downloaded it); None when there is none."""
    path = Path(base)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors"], local_files_only=True))
        except Exception:  # not a Hub id, or not in the cache: the in-memory merge downloads what it needs
            return None
    has_weights = any(p for p in path.glob("*.safetensors") if not p.name.startswith("adapter_model"))
    return path if has_weights and (path / "config.json").is_file() else None


def tensor_files(base_dir: Path) -> dict[str, Path]:
    """{tensor name: the safetensors file that holds it}, in the checkpoint's own order."""
    from safetensors import safe_open

    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        return {name: base_dir / f for name, f in json.loads(index.read_text())["weight_map"].items()}
    out: dict[str, Path] = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        if not f.name.startswith("adapter_model"):
            with safe_open(str(f), framework="pt") as st:
                out.update({name: f for name in st.keys()})
    return out


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor, with its file mapped only while it is copied (a file kept mapped would count its touched pages
    in this process's resident memory)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as st:
        return st.get_tensor(name)


class ShardWriter:
    """Tensors -> model-0000i-of-0000N.safetensors files of at most max_bytes each (+ the index when N > 1)."""

    def __init__(self, out_dir: Path, max_bytes: int | None = None):
        self.out_dir, self.max_bytes = out_dir, max_bytes or MAX_SHARD_BYTES
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.total_bytes = 0, 0
        self.shards: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if self.pending:
            save_file(self.pending, str(self.out_dir / f"shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
            self.shards.append(list(self.pending))
            self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.out_dir / f"shard-{i:05d}.tmp").rename(self.out_dir / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {t: names[i] for i, shard in enumerate(self.shards) for t in shard}}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ---------------------------------------------------------------- the merge

def merge_adapter(base: str, adapter_dir: str | Path, out_dir: str | Path, tokenizer, dtype: str = "bfloat16",
                  trust_remote_code: bool = False, log_fn: Callable[[str], Any] = log.info) -> Path:
    """LoRA merged into a full-precision copy of the base - never into 4-bit weights - saved in `dtype` with the
    tokenizer (and its chat template) next to it. Streams tensor by tensor where it can (see the module doc)."""
    from transformers import AutoConfig, GenerationConfig

    out_dir = Path(out_dir)
    base_dir = base_checkpoint_dir(base)
    changes, why = read_adapter(adapter_dir)
    if base_dir is None or why:
        log_fn(f"merge: in memory with peft ({why or 'the base has no local safetensors checkpoint'})")
        return merge_adapter_in_memory(base, adapter_dir, out_dir, tokenizer, dtype, trust_remote_code)

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    files = tensor_files(base_dir)
    text_config = config.get_text_config()
    if getattr(text_config, "tie_word_embeddings", False):  # the tied lm_head is the embedding, saved once
        changes = {k: v for k, v in changes.items() if not (k.startswith("lm_head.") and k not in files)}
    missing = sorted(set(changes) - set(files))
    if missing:
        log_fn(f"merge: in memory with peft (the adapter changes {missing[0]}, which the base's files do not hold)")
        return merge_adapter_in_memory(base, adapter_dir, out_dir, tokenizer, dtype, trust_remote_code)
    old_vocab = text_config.vocab_size
    saved_rows = [c[1].shape[0] for cs in changes.values() for c in cs if c[0] == "full"]
    new_vocab = max([old_vocab, len(tokenizer), *saved_rows])
    if new_vocab > old_vocab and not any(part in name for name in files for part in VOCAB_TENSORS):
        log_fn("merge: in memory with peft (the vocabulary grew and the base's embedding has an unknown name)")
        return merge_adapter_in_memory(base, adapter_dir, out_dir, tokenizer, dtype, trust_remote_code)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir)
    for name, path in files.items():
        tensor = read_tensor(path, name)
        if new_vocab > old_vocab and tensor.dim() == 2 and tensor.shape[0] == old_vocab and any(
                part in name for part in VOCAB_TENSORS):
            # Embedding / lm_head rows for tokens the tokenizer gained: the mean of the others, as
            # resize_token_embeddings starts them (the trained ones are then set from the adapter below).
            extra = tensor.float().mean(0, keepdim=True).expand(new_vocab - old_vocab, -1)
            tensor = torch.cat([tensor.float(), extra]).to(tensor.dtype)
        for change in changes.pop(name, []):
            tensor = apply_change(tensor, change)
        writer.add(name, tensor.to(DTYPES[dtype]))
        del tensor
    writer.close()

    text_config.vocab_size = new_vocab
    config.use_cache = True
    config.dtype = DTYPES[dtype]
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    config.save_pretrained(out_dir)
    try:
        generation = GenerationConfig.from_pretrained(base_dir)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    set_stop_ids(generation, tokenizer)
    generation.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log_fn(f"merge: streamed {len(files)} tensors into {len(writer.shards)} shard(s), "
           f"{writer.total_bytes / 2**30:.2f} GiB in {dtype}")
    return out_dir


def set_stop_ids(generation, tokenizer) -> None:
    """pad = the tokenizer's pad; eos = the tokenizer's eos first, keeping the base's other stop ids (Llama 3: eot,
    eom and eos)."""
    generation.pad_token_id = tokenizer.pad_token_id
    eos = generation.eos_token_id
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id not in eos:
        eos = [tokenizer.eos_token_id] + eos
    generation.eos_token_id = eos[0] if len(eos) == 1 else eos


def merge_adapter_in_memory(base: str, adapter_dir: str | Path, out_dir: str | Path, tokenizer,
                            dtype: str = "bfloat16", trust_remote_code: bool = False) -> Path:
    """peft's merge_and_unload on the whole base loaded in fp32 (any adapter peft can load; 4 bytes/parameter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if len(tokenizer) > m.get_input_embeddings().weight.shape[0]:
        m.resize_token_embeddings(len(tokenizer))
    m = PeftModel.from_pretrained(m, str(adapter_dir)).merge_and_unload()
    m = m.to(DTYPES[dtype])
    m.config.use_cache = True
    m.config.pad_token_id = tokenizer.pad_token_id
    m.config.eos_token_id = tokenizer.eos_token_id
    if m.generation_config is not None:
        set_stop_ids(m.generation_config, tokenizer)
    out_dir = Path(out_dir)
    m.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
