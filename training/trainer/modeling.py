"""Load the base model for LoRA training (QLoRA 4-bit / bf16 / fp32); training/export/merge.py merges the adapter.

A GGUF base (the Space's embedded SmolLM2, or any .gguf the user names) is dequantised by transformers and
written once as a normal HF checkpoint (`OUT/base/`), so every later step - 4-bit loading, merging, export -
treats it like any other base.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from training.config import LoraSection, ModelConfig, TrainConfig
from training.trainer.hardware import FLASH, Device, Plan, Request, decide, probe
from training.trainer.packing_check import FLASH_KEY


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


OUTPUT_LAYERS = {"lm_head", "embed_out"}                             # LoRA targets that are the output layer
INPUT_EMBEDDINGS = {"embed_tokens", "wte", "word_embeddings", "embed_in"}  # ... that are the input embeddings


def quantization_method(config) -> str | None:
    """The quant_method of a pre-quantized checkpoint's quantization_config (bitsandbytes, fp8, gptq, ...), else None."""
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method) or type(quant).__name__)


def attention_support(config) -> frozenset[str] | None:
    """The attn_implementations transformers has for this architecture's causal LM (None: not a built-in class)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None
    return frozenset({"eager"} | ({"sdpa"} if cls._supports_sdpa else set())
                     | ({"flex_attention"} if cls._supports_flex_attn else set())
                     | (set(FLASH) if cls._supports_flash_attn else set()))


def model_facts(config, cfg: TrainConfig) -> dict:
    """The hardware Request's fields that come from the base's config: architecture, tied embeddings, a pre-quantized
    checkpoint, the attention implementations it has and, with train.packing, whether it keeps packed sequences
    apart under each attention the plan may pick (measured on a toy copy: training.trainer.packing_check)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    support = attention_support(config)
    facts = dict(model_type=config.model_type, tied_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
                 quantized=quantization_method(config), attention_support=support)
    if cfg.train.packing and not cfg.model.trust_remote_code and not facts["quantized"]:
        from training.trainer.packing_check import packing_checks

        wanted = [cfg.model.attn_implementation] if cfg.model.attn_implementation else ["default", "flash_attention_2"]
        wanted = [a for a in wanted if a == "default" or support is None or a in support]
        facts["packing_checks"] = packing_checks(config, [FLASH_KEY if a in FLASH else a for a in wanted])
    return facts


def plan_training(cfg: TrainConfig, base: str | None = None, new_token_ids=(), device: Device | None = None,
                  mode: str | None = None, config=None) -> Plan:
    """The hardware plan (training.trainer.hardware.decide) for this recipe and base (a dir / Hub id, or its loaded
    `config`) on `device` (default: this machine). Raises PlanError for what cannot run or could not be merged."""
    if config is None and base:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(base, trust_remote_code=cfg.model.trust_remote_code)
    targets = set(cfg.lora.target_modules)
    request = Request(mode=mode or cfg.model.mode, precision=cfg.model.precision,
                      attention=cfg.model.attn_implementation, packing=cfg.train.packing, liger=cfg.train.use_liger,
                      optim=cfg.train.optim, new_token_rows=len(new_token_ids),
                      remote_code=cfg.model.trust_remote_code, lora_on_lm_head=bool(OUTPUT_LAYERS & targets),
                      lora_on_embeddings=bool(INPUT_EMBEDDINGS & targets),
                      **(model_facts(config, cfg) if config is not None else {}))
    return decide(device or probe(), request)


def resolve_mode(mode: str) -> str:
    """The mode the plan picks on this machine (auto -> qlora / lora / fp32); PlanError if it cannot run here."""
    return decide(probe(), Request(mode=mode)).mode


def local_device_map():
    """Each DDP process (accelerate launch / torchrun) puts its whole model on its own GPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return None


def load_model_for_training(base: str, model: ModelConfig, lora: LoraSection, plan: Plan | str, tokenizer,
                            new_token_ids: list[int] = ()):
    """The base with LoRA adapters attached, ready for Trainer, as `plan` says (a mode name is decided here)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if isinstance(plan, str):
        plan = decide(probe(), Request(mode=plan, precision=model.precision, attention=model.attn_implementation))
    kwargs = dict(trust_remote_code=model.trust_remote_code, device_map=local_device_map(),
                  dtype=getattr(torch, plan.weights_dtype))
    if plan.attn_implementation:
        kwargs["attn_implementation"] = plan.attn_implementation
    if plan.mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, plan.bnb_compute_dtype))
    m = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if plan.mode == "qlora":
        keep_4bit_matmuls_differentiable(m)
    if len(tokenizer) > m.get_input_embeddings().weight.shape[0]:
        m.resize_token_embeddings(len(tokenizer))
    m.config.pad_token_id = tokenizer.pad_token_id
    m.config.use_cache = False  # incompatible with gradient checkpointing; the merged model re-enables it
    # QLoRA skips peft's prepare_model_for_kbit_training: it upcasts every non-4-bit weight (embeddings, tied
    # lm_head, norms) to fp32, which doubles their memory and makes the logits fp32 - the bulk of naive QLoRA's
    # VRAM. Under 16-bit autocast the 16-bit weights train as well; trainable weights stay fp32 (below).
    if model.gradient_checkpointing:
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph under checkpointing
    target = lora.target_modules
    peft_cfg = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias, task_type="CAUSAL_LM",
        target_modules="all-linear" if target in (["all-linear"], "all-linear") else list(target),
        trainable_token_indices=trainable_token_rows(m, target, new_token_ids))
    peft_model = get_peft_model(m, peft_cfg)
    upcast_trainable(peft_model, getattr(torch, plan.trainable_dtype))
    return peft_model


def trainable_token_rows(model, lora_targets, token_ids) -> list[int] | dict[str, list[int]] | None:
    """peft's trainable_token_indices for the rows of the tokens the template added (their embeddings start as the
    mean of the others): the input embedding's rows, and the output layer's too, so a new end-of-turn token can be
    predicted. A tied base gets the list form (peft ties lm_head's rows to the embedding's); an untied one (Llama-3.1-8B,
    Mistral, Qwen2.5-7B) names both layers - except an output layer LoRA already trains (peft cannot stack the two
    on one layer), whose new rows then train through LoRA."""
    if not token_ids:
        return None
    ids = list(token_ids)
    text = model.config.get_text_config()
    if getattr(text, "tie_word_embeddings", False):
        return ids
    short = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    rows = {short[model.get_input_embeddings()]: ids}
    head = model.get_output_embeddings()
    if head is not None and short[head] not in set(lora_targets):
        rows[short[head]] = ids
    return rows


def keep_4bit_matmuls_differentiable(model) -> int:
    """Stop bitsandbytes' CPU repack of 4-bit weights; returns how many Linear4bit layers were switched.

    On a CPU with AVX512-BF16, Linear4bit repacks its weight the first time it runs in eval mode without grad
    (an evaluation) and from then on multiplies through gemv_4bit, which has no backward: training after an
    eval gets no gradient through the frozen 4-bit matmuls. Measured on a tiny Llama: the first layer's LoRA
    gradients were off by ~60% after one eval (tests/test_qlora_cpu.py checks they now match a run without it).
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def upcast_trainable(model, dtype=torch.float32) -> int:
    """Trainable weights in `dtype` (fp32): under fp16 autocast the GradScaler refuses fp16 gradients, and bf16
    updates of small weights round away. peft upcasts LoRA and trainable token rows itself; the biases that
    lora.bias=all|lora_only trains stay in the base's dtype (6 fp16 tensors on a tiny Qwen2). Returns the count."""
    n = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
            n += 1
    return n
