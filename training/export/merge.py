"""Merge a LoRA adapter into its full-precision base, one tensor at a time, and save the merged model.

Loading the whole base in fp32 to call peft's merge_and_unload needs 4 bytes per parameter (~13 GB for
Llama-3.2-3B), more than a free Colab's ~12.7 GB of RAM. Here each base tensor is read from its safetensors file,
gets W + scale * B @ A in fp32 when LoRA targets it (and its trained token rows), is cast to the output dtype and
written to the current output shard, so peak RAM is about one shard plus one tensor
(benchmarks/bench_merge.py measures it against the in-memory merge). Adapters this does not cover (DoRA, saved
full modules, LoRA on embeddings, per-layer rank patterns) and non-safetensors bases use peft's merge instead.

Both merges write exactly the model trained, base + adapter:
- LoRA on lm_head (or the input embeddings) of a tied-embedding base (SmolLM2, Llama-3.2-1B/3B, GPT-2) trained an
  output layer that differs from the input embeddings; peft's merge would add it into the one shared matrix and
  change the inputs too. The merged model is untied instead: both matrices saved, tie_word_embeddings=false (the
  transformers and GGUF loaders read both; about vocab x hidden more parameters).
- The output folder is written fresh beside the old one and swapped in, so no file of an earlier merge survives
  (transformers prefers an old single model.safetensors over a new sharded index).
- Refused with MergeError (one line) before anything is read: a pre-quantized base (its packed weights cannot take
  a LoRA sum) and adapters initialised by changing the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), whose deltas are
  relative to a base this merge does not have.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MAX_SHARD_BYTES = 1 << 30  # RAM held at once for the output; HF loaders read any number of shards
ADAPTER_PREFIX = "base_model.model."
TOKEN_DELTA = ".token_adapter.trainable_tokens_delta"
# peft saves a resized embedding / lm_head whole, under the name of the layer its adapter wraps
SAVED_WHOLE = (".token_adapter.base_layer.weight", ".base_layer.weight", ".weight")
# init_lora_weights that move part of the base into the adapter at init (peft's mutated-init schemes, LoftQ)
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# adapter_config.json keys that do not change what merging computes (init schemes, targeting, bookkeeping); any other
# key with a value (a LoRA variant this file does not know) leaves the merge to peft.
KNOWN_OPTIONS = {"base_model_name_or_path", "revision", "task_type", "peft_type", "peft_version", "auto_mapping",
                 "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
                 "layers_to_transform", "layers_pattern", "fan_in_fan_out", "bias", "use_rslora", "init_lora_weights",
                 "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_config", "megatron_core",
                 "trainable_token_indices", "ensure_weight_tying", "qalora_group_size", "use_dora", "modules_to_save",
                 "lora_bias", "rank_pattern", "alpha_pattern", "layer_replication"}
VOCAB_TENSORS = ("embed_tokens", "wte", "lm_head")  # a row per token: Llama/Qwen2/Mistral, GPT-2/GPT-Neo, output


class MergeError(ValueError):
    """An adapter or base whose merge would not be the model trained; the message is the one line to show."""


def check_mergeable(config: dict, adapter_dir: str | Path) -> None:
    """MergeError for an adapter initialised by changing its base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA):
    its B @ A is relative to that changed base, not to the original one a merge starts from."""
    init = str(config.get("init_lora_weights", True)).lower()
    scheme = next((s for s in BASE_CHANGING_INITS if init.startswith(s)), None) or next(
        (key.removesuffix("_config") for key in ("loftq_config", "corda_config", "lora_ga_config") if config.get(key)),
        None)
    if scheme:
        raise MergeError(f"the adapter in {adapter_dir} was initialised with init_lora_weights={scheme}, which "
                         "changes the base weights: merged into the original base it is not the model trained; save "
                         "it converted to plain LoRA (peft save_pretrained(path_initial_model_for_weight_conversion=...)) "
                         "or keep using base + adapter unmerged")


def check_base_not_quantized(config) -> None:
    """MergeError for a pre-quantized base: adding B @ A to its packed integers / FP8 blocks is not base + adapter."""
    from training.trainer.modeling import quantization_method

    method = quantization_method(config)
    if method:
        raise MergeError(f"the base is quantized (quantization_config.quant_method={method}): a LoRA merge needs its "
                         "full-precision weights; merge into the unquantized original")


# ---------------------------------------------------------------- what the adapter changes

def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, list[tuple]], str | None]:
    """({base tensor name: [changes, in the order peft applies them]}, None), or ({}, why peft's own merge must do
    it). A change is ("full", tensor): a resized embedding peft saved whole; ("lora", A, B, scale, transpose);
    ("rows", indices, values): trained token rows. MergeError for an adapter no merge into this base can reproduce."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    check_mergeable(config, adapter_dir)
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
        elif (suffix := next((s for s in SAVED_WHOLE if name.endswith(s)), None)) and \
                name[: -len(suffix)].rsplit(".", 1)[-1] in VOCAB_TENSORS:
            module = name[: -len(suffix)]
            change = ("full", value)
        else:
            return {}, f"adapter tensor {key}"
        changes.setdefault(f"{module}.weight", []).append(change)
    # peft's layers nest as LoRA(trainable tokens(base)): the saved base, then its token rows, then B @ A
    order = {"full": 0, "rows": 1, "lora": 2}
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

def tied_weight_names(config) -> dict[str, str]:
    """{output tensor: the input tensor it shares} for a tied causal LM ({"lm_head.weight": "model.embed_tokens.weight"}
    for Llama), from the architecture's class; {} when untied or unknown."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if not getattr(config.get_text_config(), "tie_word_embeddings", False):
        return {}
    keys = getattr(MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None), "_tied_weights_keys", None)
    return dict(keys) if isinstance(keys, dict) else {}


def conv1d_weights(config, trust_remote_code: bool = False) -> set[str]:
    """Weight names of the architecture's Conv1D layers (GPT-2's c_attn / c_proj / c_fc store (in, out)), from the
    model built on the meta device. peft decides fan_in_fan_out per layer by its type, so an adapter on Conv1D and
    Linear layers at once (DialoGPT with LoRA on lm_head) has no single right value in its config."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D)}


def untie(config) -> None:
    """Mark a config whose output layer is now its own matrix."""
    for c in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        c.tie_word_embeddings = False


def fresh_folder(out_dir: Path) -> Path:
    """An empty folder beside `out_dir` to write the merge into (one a killed merge left is removed first)."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def swap_in(partial: Path, out_dir: Path) -> Path:
    """The finished merge replaces `out_dir` whole: no file of an earlier merge (an old single model.safetensors
    beside a new sharded index, shards of another dtype) is left to be loaded or uploaded."""
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    partial.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def merge_adapter(base: str, adapter_dir: str | Path, out_dir: str | Path, tokenizer, dtype: str = "bfloat16",
                  trust_remote_code: bool = False, log_fn: Callable[[str], Any] = log.info) -> Path:
    """LoRA merged into a full-precision copy of the base - never into 4-bit weights - saved in `dtype` with the
    tokenizer (and its chat template) next to it, replacing whatever `out_dir` held. Streams tensor by tensor where
    it can (see the module doc). MergeError, before anything is written, when no merge can give the model trained."""
    from transformers import AutoConfig, GenerationConfig

    out_dir = Path(out_dir)
    base_dir = base_checkpoint_dir(base)
    changes, why = read_adapter(adapter_dir)
    config = AutoConfig.from_pretrained(base_dir or base, trust_remote_code=trust_remote_code)
    check_base_not_quantized(config)
    if base_dir is None or why:
        log_fn(f"merge: in memory with peft ({why or 'the base has no local safetensors checkpoint'})")
        return merge_adapter_in_memory(base, adapter_dir, out_dir, tokenizer, dtype, trust_remote_code, log_fn)

    files = tensor_files(base_dir)
    text_config = config.get_text_config()
    conv1d = conv1d_weights(config, trust_remote_code)
    changes = {name: [c[:4] + (name in conv1d,) if c[0] == "lora" else c for c in cs] for name, cs in changes.items()}
    tied = {out: src for out, src in tied_weight_names(config).items() if out not in files and src in files}
    # LoRA on a tied lm_head trained an output layer of its own: written beside the embedding (see the module doc).
    # Any other change peft saved for a tied lm_head repeats the embedding's (its token rows are the embedding's).
    head_lora = {out: [c for c in changes.get(out, []) if c[0] == "lora"] for out in tied}
    head_lora = {out: cs for out, cs in head_lora.items() if cs}
    changes = {k: v for k, v in changes.items() if k not in tied}
    missing = sorted(set(changes) - set(files))
    if missing:
        log_fn(f"merge: in memory with peft (the adapter changes {missing[0]}, which the base's files do not hold)")
        return merge_adapter_in_memory(base, adapter_dir, out_dir, tokenizer, dtype, trust_remote_code, log_fn)
    old_vocab = text_config.vocab_size
    saved_rows = [c[1].shape[0] for cs in changes.values() for c in cs if c[0] == "full"]
    new_vocab = max([old_vocab, len(tokenizer), *saved_rows])
    if new_vocab > old_vocab and not any(part in name for name in files for part in VOCAB_TENSORS):
        log_fn("merge: in memory with peft (the vocabulary grew and the base's embedding has an unknown name)")
        return merge_adapter_in_memory(base, adapter_dir, out_dir, tokenizer, dtype, trust_remote_code, log_fn)
    partial = fresh_folder(out_dir)
    writer = ShardWriter(partial)
    for name, path in files.items():
        tensor = read_tensor(path, name)
        if new_vocab > old_vocab and tensor.dim() == 2 and tensor.shape[0] == old_vocab and any(
                part in name for part in VOCAB_TENSORS):
            # Embedding / lm_head rows for tokens the tokenizer gained: the mean of the others (the trained ones
            # are then set from the adapter below).
            extra = tensor.float().mean(0, keepdim=True).expand(new_vocab - old_vocab, -1)
            tensor = torch.cat([tensor.float(), extra]).to(tensor.dtype)
        for change in changes.pop(name, []):
            tensor = apply_change(tensor, change)
        writer.add(name, tensor.to(DTYPES[dtype]))
        for out in [out for out, src in tied.items() if src == name and out in head_lora]:
            head = tensor
            for change in head_lora[out]:
                head = apply_change(head, change)
            writer.add(out, head.to(DTYPES[dtype]))
            del head
        del tensor
    writer.close()

    text_config.vocab_size = new_vocab
    if head_lora:
        untie(config)
        log_fn(f"merge: LoRA trained {', '.join(head_lora)} of a tied-embedding base: saved as its own matrix "
               "(tie_word_embeddings=false), the input embeddings unchanged")
    config.use_cache = True
    config.dtype = DTYPES[dtype]
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    config.save_pretrained(partial)
    try:
        generation = GenerationConfig.from_pretrained(base_dir)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    set_stop_ids(generation, tokenizer)
    generation.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    swap_in(partial, out_dir)
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


def lora_on_tied_embeddings(model, adapter_dir: str | Path) -> bool:
    """Whether `model` ties its output layer to its input embeddings and the adapter puts LoRA on either of them."""
    from safetensors import safe_open

    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None or outputs.weight is not inputs.weight:
        return False
    names = {module: name for name, module in model.named_modules()}
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as st:
        keys = list(st.keys())
    return any(f".{names[m]}.lora_" in key for key in keys for m in (inputs, outputs))


def split_shared_weight(model, embedding) -> int:
    """Every other holder of `embedding`'s weight (the tied lm_head, under peft's wrappers) gets its own copy, so a
    merge adds each layer's delta to its own matrix; returns how many were split."""
    shared, n = embedding.weight, 0
    for module in model.modules():
        if module is embedding:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param is shared:
                setattr(module, name, torch.nn.Parameter(param.detach().clone(), requires_grad=False))
                n += 1
    return n


def merge_token_rows(model):
    """peft's trainable token rows merged into their layers first, the plain layers put back: under a LoRA layer (a
    tied lm_head with LoRA: LoRA(token rows(lm_head))) merge_and_unload would add B @ A before writing the rows over
    it, and leave the wrapper in place."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "token_adapter") and hasattr(module, "unload_and_optionally_merge_module"):
            parent_name, _, attr = name.rpartition(".")
            plain = module.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, plain)
    return model


def merge_adapter_in_memory(base: str, adapter_dir: str | Path, out_dir: str | Path, tokenizer,
                            dtype: str = "bfloat16", trust_remote_code: bool = False,
                            log_fn: Callable[[str], Any] = log.info) -> Path:
    """peft's merge_and_unload on the whole base loaded in fp32 (any adapter peft can load; 4 bytes/parameter),
    replacing whatever `out_dir` held; a tied base with LoRA on its embeddings or lm_head is untied first."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    check_mergeable(json.loads((Path(adapter_dir) / "adapter_config.json").read_text()), adapter_dir)
    check_base_not_quantized(AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code))
    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if len(tokenizer) > m.get_input_embeddings().weight.shape[0]:
        m.resize_token_embeddings(len(tokenizer))
    embedding, untied = m.get_input_embeddings(), lora_on_tied_embeddings(m, adapter_dir)
    m = PeftModel.from_pretrained(m, str(adapter_dir))  # loaded tied, as trained (token rows are shared then)
    if untied:
        split_shared_weight(m, embedding)
        untie(m.config)
    m = merge_token_rows(m).merge_and_unload()
    if untied:
        log_fn("merge: LoRA on the embeddings / lm_head of a tied-embedding base: both saved as their own matrices "
               "(tie_word_embeddings=false)")
    m = m.to(DTYPES[dtype])
    m.config.use_cache = True
    m.config.pad_token_id = tokenizer.pad_token_id
    m.config.eos_token_id = tokenizer.eos_token_id
    if m.generation_config is not None:
        set_stop_ids(m.generation_config, tokenizer)
    out_dir = Path(out_dir)
    partial = fresh_folder(out_dir)
    m.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    return swap_in(partial, out_dir)
