"""Typed training config: nested dataclasses filled from a YAML recipe, then CLI overrides.

    python training/finetune.py --config training/configs/smollm2-135m-cpu.yaml --train.learning_rate 1e-4 --r 8

A leaf can be named in full (`--lora.r`) or by its bare name when that name is unique (`--r`). Unknown keys,
in the YAML or on the command line, are an error that names the key and lists the accepted ones.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.data import DataConfig, SourceConfig
from training.trainer.hardware import MODES, PRECISIONS


@dataclass
class ModelConfig:
    name_or_path: str = "embedded"     # HF dir or Hub id; a .gguf file; "embedded" = the Space's SmolLM2 GGUF
    gguf_file: str | None = None       # GGUF file name inside name_or_path (loaded dequantised to fp32)
    chat_template: str | None = None   # used only when the base has none: "chatml", a .jinja file or a tokenizer dir
    mode: str = "auto"                 # auto (GPU: qlora, CPU: fp32) | qlora (4-bit base) | lora (16-bit) | fp32 | bf16
    precision: str = "auto"            # auto | bf16 | fp16 | fp32; auto: bf16 on sm80+, fp16 on older GPUs, fp32 on CPU
    gradient_checkpointing: bool = True
    attn_implementation: str | None = None  # sdpa, eager, flash_attention_2; None: flash-attn on sm80+, else sdpa
    trust_remote_code: bool = False


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # "all-linear" or module names
    bias: str = "none"


@dataclass
class TrainSection:
    output_dir: str = "runs/default"
    max_length: int = 2048             # tokens per example after the chat template; longer ones are cut
    num_train_epochs: float = 1.0
    max_steps: int = -1                # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 2
    per_device_eval_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_8bit"          # 8-bit needs bitsandbytes (CPU too; else adamw_torch); paged_*: CUDA only
    logging_steps: int = 10
    eval_steps: int = 250              # eval loss on the validation split every N steps (0 = only at the end)
    save_steps: int = 1250             # checkpoint every N steps
    save_total_limit: int | None = 3
    save_minutes: float | None = None  # also checkpoint every N minutes of wall time, whichever comes first
    preemption_notice_s: float = 30.0  # SIGTERM to kill on spot machines (GCP/Azure 30 s, AWS 120): push wait bound
    seed: int = 42
    report_to: str = "auto"            # auto (tensorboard/wandb when installed) | none | tensorboard | wandb | a,b
    resume: bool = False               # continue from the newest checkpoint: OUT/checkpoint-N, else the Hub repo's
    packing: bool = False              # padding-free batches (position_ids) instead of padding
    use_liger: bool = False            # Liger fused linear+cross-entropy etc. (sm80+, liger-kernel; not with new rows)
    dataloader_num_workers: int = 0
    objective: str = "sft"             # sft | dpo | kto (preference data: training/data/preference.py)
    beta: float = 0.1                  # dpo/kto: how far from the base model the trained one may move


@dataclass
class ExportSection:
    merge: bool = True                 # write OUT/merged: LoRA merged into a full-precision copy of the base
    merged_dtype: str = "bfloat16"     # bfloat16 | float16 | float32
    gguf: bool = True                  # write OUT/gguf/*.gguf from the merged model
    gguf_quants: list[str] = field(default_factory=lambda: ["q4_k_m"])


@dataclass
class HubSection:
    push_to_hub: str | None = None     # USER/NAME; token from HF_TOKEN
    push_checkpoints: bool = False     # also upload each checkpoint as it is saved
    private: bool = False


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    export: ExportSection = field(default_factory=ExportSection)
    hub: HubSection = field(default_factory=HubSection)


CHOICES = {
    "model.mode": MODES,
    "model.precision": PRECISIONS,
    "export.merged_dtype": ("bfloat16", "float16", "float32"),
    "lora.bias": ("none", "all", "lora_only"),
    "train.objective": ("sft", "dpo", "kto"),
}


class ConfigError(ValueError):
    """A training configuration error (recipe, CLI option); str() is the one line shown to the user.

    Everything in `training/` raises this one. The serving code it calls raises chatbot.settings.ConfigError,
    which training code catches and converts where it calls it (evaluate.py's judge, for one).
    """


# ---------------------------------------------------------------- leaves and types

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def _leaves(cls=TrainConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf name -> type, for every non-dataclass field (data.sources is a leaf: a list of sources)."""
    out = {}
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaves(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def _resolve_key(key: str, leaves: dict[str, Any]) -> str:
    key = key.lstrip("-").replace("-", "_")
    if key in leaves:
        return key
    matches = [k for k in leaves if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"option {key!r} is ambiguous: use one of {', '.join(matches)}")
    raise ConfigError(f"unknown option {key!r}; accepted: {', '.join(leaves)}")


def _source(value: Any) -> SourceConfig:
    if isinstance(value, SourceConfig):
        return value
    if isinstance(value, str):
        return SourceConfig(path=value)
    if isinstance(value, dict):
        accepted = [f.name for f in dataclasses.fields(SourceConfig)]
        unknown = [k for k in value if k not in accepted]
        if unknown:
            raise ConfigError(f"unknown key data.sources[].{unknown[0]}; accepted: {', '.join(accepted)}")
        if "path" not in value:
            raise ConfigError("data.sources[] entry needs a 'path'")
        return SourceConfig(**{k: _coerce(f"data.sources[].{k}", v, _hints(SourceConfig)[k]) for k, v in value.items()})
    raise ConfigError(f"data.sources entries must be a path or a mapping, got {value!r}")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Turn a YAML value or a CLI string into the field's type, or fail naming the option."""
    import yaml

    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(name, value, next(a for a in args if a is not type(None)))
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith(("[", "{", "-")) else None
            value = parsed if parsed is not None else [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (str, dict)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        if args and args[0] is SourceConfig:
            return [_source(v) for v in value]
        return [_coerce(name, v, args[0]) if args else v for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    try:
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {tp.__name__}, got {value!r}") from None
    return value


# ---------------------------------------------------------------- building configs

def _set(cfg: TrainConfig, dotted: str, value: Any) -> None:
    *path, leaf = dotted.split(".")
    obj = cfg
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, leaf, value)


def _check(cfg: TrainConfig) -> TrainConfig:
    for name, accepted in CHOICES.items():
        section, leaf = name.split(".")
        value = getattr(getattr(cfg, section), leaf)
        if value not in accepted:
            raise ConfigError(f"{name}={value!r} is not accepted; use one of {', '.join(accepted)}")
    for name in ("train.max_length", "train.per_device_train_batch_size", "train.gradient_accumulation_steps",
                 "train.save_steps", "lora.r"):
        section, leaf = name.split(".")
        if getattr(getattr(cfg, section), leaf) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(getattr(cfg, section), leaf)!r}")
    if cfg.train.save_minutes is not None and cfg.train.save_minutes <= 0:
        raise ConfigError(f"train.save_minutes must be > 0 (or none), got {cfg.train.save_minutes!r}")
    if not cfg.train.preemption_notice_s > 0:
        raise ConfigError(f"train.preemption_notice_s={cfg.train.preemption_notice_s!r} is not valid; accepted: "
                          "seconds > 0")
    if not 0 <= cfg.train.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {cfg.train.warmup_ratio!r}")
    return cfg


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Set leaves from {"lora.r": "8", "learning_rate": 1e-4, ...}; strings are converted to the field's type."""
    leaves = _leaves()
    for key, value in overrides.items():
        dotted = _resolve_key(key, leaves)
        _set(cfg, dotted, _coerce(dotted, value, leaves[dotted]))
    return _check(cfg)


def _flatten_yaml(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested YAML mapping -> {"section.leaf": value}; unknown sections/keys are errors."""
    leaves = _leaves()
    sections = {k.rsplit(".", 1)[0] for k in leaves if "." in k}
    out = {}
    for key, value in (tree or {}).items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted in sections:
            out.update(_flatten_yaml(value, dotted + "."))
        elif dotted in leaves:
            out[dotted] = value
        else:
            accepted = sorted({k.split(".")[0] for k in leaves}) if not prefix else \
                [k for k in leaves if k.startswith(prefix)]
            raise ConfigError(f"unknown key {dotted!r} in the recipe; accepted: {', '.join(accepted)}")
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A recipe (YAML; None = all defaults) with overrides applied on top."""
    import yaml

    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {str(path)!r}: no such file")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"--config {str(path)!r}: expected a YAML mapping of sections")
        apply_overrides(cfg, {k: v for k, v in _flatten_yaml(tree).items()})
    return apply_overrides(cfg, overrides or {})


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


# ---------------------------------------------------------------- command line

def _comments(cls) -> dict[str, str]:
    """The `# ...` comment after each field in the class source: the --help text."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", src, re.M)}


def help_text() -> str:
    lines = ["usage: python training/finetune.py --config RECIPE.yaml [--section.option VALUE ...]",
             "",
             "  --config PATH           YAML recipe (training/configs/*.yaml); options below override it",
             "  --resume                continue from the newest checkpoint in train.output_dir or hub.push_to_hub",
             "  --push-to-hub USER/NAME upload adapter, merged model, GGUF and model card (token: HF_TOKEN)",
             "  --push-checkpoints      also upload every checkpoint as it is saved",
             "",
             "Every option (a unique leaf name also works: --r 8, --learning_rate 1e-4):"]
    default = TrainConfig()
    for section in dataclasses.fields(TrainConfig):
        cls = type(getattr(default, section.name))
        notes = _comments(cls)
        for f in dataclasses.fields(cls):
            value = getattr(getattr(default, section.name), f.name)
            shown = [s.path for s in value] if f.name == "sources" else value
            note = notes.get(f.name, "")
            lines.append(f"  --{section.name}.{f.name} (default: {shown!r})" + (f"  {note}" if note else ""))
    return "\n".join(lines)


_BOOL_WORDS = ("true", "false", "1", "0", "yes", "no", "on", "off")


def parse_args(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """argv -> (recipe path, overrides). `--flag` alone sets a boolean option to true."""
    leaves = _leaves()
    config, overrides, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.name VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            is_flag = key != "config" and leaves[_resolve_key(key, leaves)] is bool
            if is_flag and (nxt is None or nxt.lower() not in _BOOL_WORDS):
                value = "true"                      # bare --resume, --push-checkpoints
            elif nxt is None:
                raise ConfigError(f"option --{key} needs a value")
            else:
                value, i = nxt, i + 1
        if key == "config":
            config = value
        else:
            overrides[_resolve_key(key, leaves)] = value
        i += 1
    return config, overrides


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    config, overrides = parse_args(sys.argv[1:] if argv is None else list(argv))
    return load_config(config, overrides)


if __name__ == "__main__":
    print(help_text())
