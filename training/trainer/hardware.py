"""How a run trains on this machine: one decision from the device and the recipe, read by everything else.

`decide(device, request)` is pure: a `Device` (name, compute capability, memory, installed bitsandbytes /
flash-attn / liger-kernel) and a `Request` (the recipe's choices and the model facts that matter) give a `Plan`:
base weights, precision, 4-bit compute dtype, attention, packing, Liger and optimizer, each with its reason.
`probe()` describes the real device. An explicit setting that cannot run there, or a base and recipe whose trained
model the merge could not reproduce, raises `PlanError` (one line) before anything is computed. Whether the model
keeps packed sequences apart is measured on its architecture (training.trainer.packing_check), not assumed.
The rules and why: each rule's function below; the table per GPU: docs/fine-tuning.md, "The hardware plan".
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from dataclasses import dataclass, field

from training.trainer.packing_check import FLASH_KEY

# bitsandbytes' CPU backend warns at import that the optional `kernels` package (fetched from the Hub at run time)
# is missing; its built-in CPU kernels are the ones this project runs and tests, so the line is only noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

MODES = ("auto", "qlora", "lora", "bf16", "fp32")        # model.mode (bf16 = lora in bf16, the older name)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")           # model.precision
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
FLASH = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
HOPPER_FLASH = ("flash_attention_3", "flash_attention_4")  # the wheels and kernels-community builds are sm90+


class PlanError(ValueError):
    """A setting that cannot run on this device; the message is the one line to show."""


@dataclass(frozen=True)
class Device:
    name: str = "cpu"
    capability: tuple[int, int] | None = None   # CUDA compute capability; None = no GPU
    memory_gib: float = 0.0
    packages: frozenset[str] = frozenset()       # installed: bitsandbytes, flash_attn, liger_kernel
    count: int = 1                               # GPUs visible (or CPU cores)
    liger_model_types: frozenset[str] | None = None  # model types the installed Liger patches (None = unknown)

    @property
    def cuda(self) -> bool:
        return self.capability is not None

    @property
    def sm(self) -> int:
        return self.capability[0] * 10 + self.capability[1] if self.capability else 0

    def describe(self) -> str:
        if not self.cuda:
            return f"cpu ({self.count} cores, {self.memory_gib:.0f} GiB RAM)"
        return f"{self.name} (sm{self.sm}, {self.memory_gib:.0f} GiB)" + (f" x{self.count}" if self.count > 1 else "")


@dataclass(frozen=True)
class Request:
    """What the recipe asks for ("auto"/None = let the device decide) plus the model facts the choice needs."""
    mode: str = "auto"
    precision: str = "auto"
    attention: str | None = None
    packing: bool = False
    liger: bool = False
    optim: str = "adamw_torch"
    model_type: str | None = None
    new_token_rows: int = 0          # tokens the tokenizer grew (trained through peft's trainable tokens)
    tied_embeddings: bool = False
    lora_on_lm_head: bool = False
    lora_on_embeddings: bool = False  # LoRA on the input embedding layer (embed_tokens, wte, ...)
    remote_code: bool = False        # trust_remote_code: modelling code transformers does not ship
    quantized: str | None = None     # the base's quantization_config quant_method (a pre-quantized checkpoint)
    attention_support: frozenset[str] | None = None  # attn_implementations the model class has (None = unknown)
    # attention ("default", "eager", "sdpa", "flex_attention", FLASH_KEY) -> (packs correctly, why), measured by
    # training.trainer.packing_check on the base's architecture; an attention not in it is not known to pack.
    packing_checks: dict[str, tuple[bool, str]] | None = field(default=None, hash=False)


@dataclass(frozen=True)
class Plan:
    device: str
    mode: str                        # qlora (4-bit nf4 base) | lora (16-bit base) | fp32
    precision: str                   # bf16 | fp16 | fp32: the autocast dtype (TrainingArguments bf16 / fp16)
    weights_dtype: str               # dtype of the base's unquantised weights (from_pretrained dtype)
    bnb_compute_dtype: str | None    # 4-bit matmuls dequantise to this (qlora only)
    trainable_dtype: str             # LoRA and new token rows; fp32 under 16-bit autocast
    attention: str                   # what the model is loaded with ("default": the architecture's own)
    packing: bool
    liger: bool
    optim: str
    tf32: bool                       # TF32 matmuls for what stays fp32 (sm80+)
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def attn_implementation(self) -> str | None:
        """The from_pretrained argument: None leaves the architecture's default (sdpa where it exists)."""
        return None if self.attention == "default" else self.attention

    def with_attention(self, loaded: str | None) -> Plan:
        """"default" replaced by what the architecture picked once loaded (model.config._attn_implementation)."""
        return dataclasses.replace(self, attention=loaded) if self.attention == "default" and loaded else self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _mode(device: Device, req: Request) -> tuple[str, str, str]:
    """(mode, precision asked, reason)."""
    has_bnb = "bitsandbytes" in device.packages
    mode, precision = req.mode, req.precision
    if mode == "bf16":  # the older name: 16-bit LoRA in bf16
        if precision not in ("auto", "bf16"):
            raise PlanError(f"model.mode=bf16 asks for bf16 but model.precision={precision}; "
                            f"use model.mode=lora with model.precision={precision}")
        mode, precision = "lora", "bf16"
    if mode == "qlora" and not has_bnb:
        raise PlanError("model.mode=qlora needs bitsandbytes: pip install bitsandbytes==0.50.2 "
                        "(or use model.mode=lora / fp32)")
    if mode != "auto":
        return mode, precision, "set by model.mode"
    if not device.cuda:
        return "fp32", precision, "auto on CPU: fp32 LoRA trains the very weights it merges (4-bit saves memory only)"
    if has_bnb:
        return "qlora", precision, "auto on a GPU with bitsandbytes: 4-bit nf4 base"
    return "lora", precision, "auto on a GPU without bitsandbytes: 16-bit base (pip install bitsandbytes for 4-bit)"


def _precision(device: Device, mode: str, asked: str) -> tuple[str, str]:
    # T4 (sm75) / V100 (sm70): torch.cuda.is_bf16_supported() answers True through emulation (no tensor cores,
    # SDPA falls back to its math kernel), so bf16 is chosen only from sm80 on.
    if asked == "fp16" and not device.cuda:
        raise PlanError("model.precision=fp16 needs a CUDA GPU (mixed precision with loss scaling); "
                        "use model.precision=fp32 or auto on CPU")
    if asked != "auto":
        if asked == "bf16" and device.cuda and device.sm < 80:
            return asked, f"set by model.precision; bf16 is emulated on sm{device.sm} (slower than fp16)"
        return asked, "set by model.precision"
    if mode == "fp32" or not device.cuda:
        return "fp32", "CPU" if not device.cuda else "model.mode=fp32"
    if device.sm >= 80:
        return "bf16", f"sm{device.sm} has native bf16"
    return "fp16", (f"sm{device.sm} has no native bf16 (emulated: no tensor cores): fp16 with loss scaling, "
                    "trainable weights in fp32")


def _model_refusals(req: Request) -> None:
    """Bases and recipes whose trained model the merge could not write: refused before anything runs."""
    if req.quantized:
        raise PlanError(f"model.name_or_path is already quantized (quantization_config.quant_method={req.quantized}): "
                        "LoRA merged into its packed weights would not be the model trained; use the unquantized "
                        "original (model.mode=qlora quantizes it to 4-bit here)")
    if req.lora_on_embeddings and req.new_token_rows:
        raise PlanError(f"lora.target_modules includes the input embeddings while the chat template adds "
                        f"{req.new_token_rows} tokens, whose rows train as peft trainable tokens; peft 0.21.2 cannot "
                        "put both on one layer: drop the embedding layer from lora.target_modules")


def _flash_supported(req: Request) -> bool:
    return req.attention_support is None or "flash_attention_2" in req.attention_support


def _attention(device: Device, req: Request, precision: str) -> tuple[str, str]:
    has_fa = "flash_attn" in device.packages
    if req.attention:
        if req.attention_support is not None and req.attention not in req.attention_support:
            raise PlanError(f"model.attn_implementation={req.attention} is not implemented for {req.model_type} models "
                            f"in transformers; accepted for this model: {', '.join(sorted(req.attention_support))}")
        if req.attention in FLASH:
            if not device.cuda or device.sm < 80:
                raise PlanError(f"model.attn_implementation={req.attention} needs an Ampere or newer GPU (sm80+); "
                                f"this is {device.describe()}: use sdpa")
            if req.attention in HOPPER_FLASH and device.sm < 90:
                raise PlanError(f"model.attn_implementation={req.attention} needs a Hopper or newer GPU (sm90+): its "
                                f"wheels and kernels are built for sm90; this is {device.describe()}: use "
                                "flash_attention_2")
            if req.attention == "flash_attention_2" and not has_fa:
                raise PlanError("model.attn_implementation=flash_attention_2 needs flash-attn: "
                                "pip install flash-attn (or use sdpa)")
            if precision == "fp32":
                raise PlanError(f"model.attn_implementation={req.attention} needs 16-bit compute; "
                                "use model.precision=bf16 (or sdpa)")
        return req.attention, "set by model.attn_implementation"
    if device.cuda and device.sm >= 80 and has_fa and precision in ("bf16", "fp16"):
        if _flash_supported(req):
            return "flash_attention_2", "flash-attn installed, sm80+: varlen kernel, no mask"
        return "default", f"the architecture's default: transformers has no flash-attention path for {req.model_type}"
    if device.cuda and device.sm >= 80 and precision in ("bf16", "fp16"):
        return "default", "the architecture's default; pip install flash-attn for its varlen kernel"
    needs = ("16-bit compute" if device.cuda and device.sm >= 80 else f"sm80+, this is sm{device.sm}" if device.cuda
             else "a GPU")
    return "default", f"the architecture's default; flash-attn 2 needs {needs}"


def _packing(req: Request, attention: str) -> tuple[bool, str]:
    # transformers 5 splits packed rows by their restarting position_ids only where a model hands them to its mask
    # (sdpa / eager / flex) or its attention call (flash varlen); some architectures do not (OPT, Bloom, MPT) or mix
    # tokens outside attention (LFM2's convolutions). packing_check measures it on the base's own architecture.
    if not req.packing:
        return False, "train.packing=false: padded batches"
    if req.remote_code:
        return False, "trust_remote_code model: its attention may ignore packed position_ids; padded batches"
    check = (req.packing_checks or {}).get(FLASH_KEY if attention in FLASH else attention)
    if check is None:
        return False, f"not checked for this model with attention {attention!r}; padded batches"
    return check


def _liger(device: Device, req: Request) -> tuple[bool, str]:
    if not req.liger:
        return False, "train.use_liger=false"
    if not device.cuda:
        return False, "Liger's Triton kernels need CUDA"
    if "liger_kernel" not in device.packages:
        return False, "liger-kernel is not installed (requirements-gpu.txt)"
    if device.sm < 80:
        return False, f"sm{device.sm}: Liger's kernels are used here only on sm80+ (bf16-native GPUs)"
    if device.liger_model_types is not None and req.model_type and req.model_type not in device.liger_model_types:
        return False, f"Liger has no kernels for model type {req.model_type!r}"
    if req.new_token_rows:
        return False, (f"the tokenizer grew {req.new_token_rows} token rows, trained through peft's trainable tokens "
                       "(lm_head's rows too): Liger's fused loss reads lm_head.weight directly and would skip them "
                       "(the merge would not)")
    if req.lora_on_lm_head:
        return False, "LoRA on lm_head: Liger's fused loss reads lm_head.weight directly and would skip it"
    return True, "fused linear + cross-entropy (no full logits), RMSNorm, SwiGLU, RoPE kernels"


def _optim(device: Device, req: Request) -> tuple[str, str]:
    optim = req.optim
    if "8bit" not in optim:
        return optim, "set by train.optim"
    if "bitsandbytes" not in device.packages:
        return "adamw_torch", f"{optim} needs bitsandbytes: torch AdamW"
    if optim.startswith("paged_") and not device.cuda:
        # paged optimizers page state through CUDA unified memory; the plain 8-bit one has CPU kernels
        return optim.removeprefix("paged_"), f"{optim} pages through CUDA memory: the unpaged 8-bit AdamW on CPU"
    return optim, "bitsandbytes 8-bit AdamW"


def decide(device: Device, req: Request) -> Plan:
    """The whole training setup for `req` on `device` (pure; raises PlanError for settings that cannot run)."""
    if req.mode not in MODES:
        raise PlanError(f"model.mode={req.mode!r} is not valid; accepted: {', '.join(MODES)}")
    if req.precision not in PRECISIONS:
        raise PlanError(f"model.precision={req.precision!r} is not valid; accepted: {', '.join(PRECISIONS)}")
    _model_refusals(req)
    mode, asked, why_mode = _mode(device, req)
    precision, why_precision = _precision(device, mode, asked)
    attention, why_attention = _attention(device, req, precision)
    packing, why_packing = _packing(req, attention)
    liger, why_liger = _liger(device, req)
    optim, why_optim = _optim(device, req)
    weights = "fp32" if mode == "fp32" else precision
    return Plan(
        device=device.describe(), mode=mode, precision=precision,
        weights_dtype=TORCH_DTYPES[weights],
        bnb_compute_dtype=TORCH_DTYPES[precision] if mode == "qlora" else None,
        trainable_dtype="float32", attention=attention, packing=packing, liger=liger, optim=optim,
        tf32=device.cuda and device.sm >= 80,
        reasons={"mode": why_mode, "precision": why_precision, "attention": why_attention, "packing": why_packing,
                 "liger": why_liger, "optim": why_optim})


# ---------------------------------------------------------------- the real device

OPTIONAL_PACKAGES = ("bitsandbytes", "flash_attn", "liger_kernel")


def installed_packages() -> frozenset[str]:
    return frozenset(p for p in OPTIONAL_PACKAGES if importlib.util.find_spec(p) is not None)


def _liger_model_types(packages: frozenset[str]) -> frozenset[str] | None:
    if "liger_kernel" not in packages:
        return None
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # an import that fails (no Triton, no CUDA) leaves the type check to Liger itself
        return None
    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def probe() -> Device:
    """This process's device: its GPU (LOCAL_RANK's under DDP) or the CPU, and what is installed."""
    import psutil
    import torch

    packages = installed_packages()
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", 0))
        props = torch.cuda.get_device_properties(index)
        return Device(name=props.name, capability=(props.major, props.minor), memory_gib=props.total_memory / 2**30,
                      packages=packages, count=torch.cuda.device_count(),
                      liger_model_types=_liger_model_types(packages))
    return Device(name="cpu", memory_gib=psutil.virtual_memory().total / 2**30, packages=packages,
                  count=os.cpu_count() or 1)
