"""Every CHATBOT_* setting, read from the environment in one place and validated at start-up.

A bad value raises ConfigError with one line naming the variable, the value and what is accepted;
app.py prints that line and exits 2, so a user error never shows a stack trace.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, TypeVar

BACKEND_NAMES = ("llama_cpp", "transformers", "mock", "openai")
DEVICE_NAMES = ("auto", "cpu", "cuda")  # CHATBOT_DEVICE (transformers only; chatbot/device.py)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
MAX_PARALLEL = 64  # CHATBOT_PARALLEL's bound: each sequence holds CHATBOT_N_CTX tokens of KV
DEFAULT_OPENAI_BASE_URL = "http://127.0.0.1:8080/v1"  # llama.cpp's llama-server default

T = TypeVar("T")


class ConfigError(ValueError):
    """A serving configuration error; str() is the one line shown to the user.

    Everything in `chatbot/` raises this one; `training/` has its own (training.config.ConfigError) and converts
    this one where it calls the serving code (e.g. evaluate.py's judge).
    """


def first_line(exc: BaseException) -> str:
    """An exception as one short line for a ConfigError message: its type and the first line of its text."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


@dataclass(frozen=True)
class Settings:
    backend: str = "llama_cpp"
    model: str | None = None             # Hub repo id or local path; None = the backend's default
    gguf_file: str | None = None         # llama_cpp: file name or glob inside CHATBOT_MODEL
    adapter: str | None = None           # transformers: PEFT adapter repo id or path
    device: str = "auto"                 # transformers: auto | cpu | cuda (chatbot/device.py decides)
    revision: str | None = None          # Hub revision (branch, tag or commit) of model and adapter
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_new_tokens: int = 512
    temperature: float = 0.2             # SmolLM2's model card recommends 0.2 / 0.9
    top_p: float = 0.9
    min_p: float = 0.05                  # llama.cpp's default; 0 = off
    repeat_penalty: float = 1.2          # 1 = off; measured: the embedded model's answers loop 38% at 1.0, 6% at
    #                                      1.1, 0% at 1.2 (benchmarks/bench_turns.py, docs/benchmarks.md)
    seed: int | None = None
    n_ctx: int = 4096                    # 0 = the model's full trained length
    threads: int = 1                     # load_settings: CPU_CORES, else half the logical CPUs
    max_input_chars: int = 8000
    max_system_chars: int = 8000         # the system prompt a visitor may send; longer is refused before the model
    max_history_chars: int = 32000       # the conversation sent with a message; older turns beyond it are left out
    #                                      before any tokenising (the 4096-token context holds ~16,000 characters)
    openai_base_url: str = DEFAULT_OPENAI_BASE_URL
    openai_api_key: str = field(default="sk-no-key-required", repr=False)
    mock_delay: float = 0.05
    mock_reply: str | None = None
    llama_repack: bool = False           # llama.cpp extra buffer types (AMX / repacked weights)
    cache_mb: int = 1024                 # llama_cpp: RAM for per-conversation prompt caches; 0 = off
    parallel: int = 4                    # llama_cpp: conversations decoded together in one batch (each with its
    #                                      own CHATBOT_N_CTX of KV); 1 = one at a time, the serial path
    feedback_dir: str | None = None      # visitor ratings -> DIR/*.jsonl (chatbot.feedback); None = off
    feedback_dataset: str | None = None  # also push feedback_dir to this private Hub dataset
    feedback_max_mb: int = 200           # recording stops once this process's records reach it (nothing is lost)
    arena_model: str | None = None       # the Arena's second model (chatbot/arena.py), by CHATBOT_MODEL's rules;
    #                                      None = no Arena tab
    arena_gguf_file: str | None = None   # llama_cpp: file name or glob inside CHATBOT_ARENA_MODEL


def _get(env: Mapping[str, str], name: str) -> str | None:
    # Spaces and docker often pass unset variables as empty strings: treat those as unset.
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _bad(name: str, value: str, accepted: str) -> ConfigError:
    return ConfigError(f"{name}={value!r} is not valid; accepted: {accepted}")


def _number(env: Mapping[str, str], name: str, kind: Callable[[str], T], default: T,
             lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> T:
    raw = _get(env, name)
    if raw is None:
        return default
    what = "an integer" if kind is int else "a number"
    if lo is not None and hi is not None:
        accepted = f"{what} {'>' if lo_open else '>='} {lo} and <= {hi}"
    elif lo is not None:
        accepted = f"{what} {'>' if lo_open else '>='} {lo}"
    else:
        accepted = what
    try:
        value = kind(raw)
    except ValueError:
        raise _bad(name, raw, accepted) from None
    if value != value or (lo is not None and (value <= lo if lo_open else value < lo)) \
            or (hi is not None and value > hi):
        raise _bad(name, raw, accepted)
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _get(env, name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise _bad(name, raw, "1/true/yes/on or 0/false/no/off")


def default_threads(env: Mapping[str, str]) -> int:
    """CPU_CORES (set by Hugging Face Spaces to the vCPUs the Space really has), else half the logical CPUs.

    Half is llama-cpp-python's own default (physical cores on SMT machines). More threads than free cores is
    far worse than fewer: llama.cpp's threads spin at barriers, and on a busy 2-core box 2 threads ran
    20× slower than 1.
    """
    return _number(env, "CPU_CORES", int, max(1, (os.cpu_count() or 1) // 2), lo=1)


def _feedback(env: Mapping[str, str]) -> dict:
    """CHATBOT_FEEDBACK_DIR / CHATBOT_FEEDBACK_DATASET (off unless set; a dataset alone uses a temp folder)."""
    folder, dataset = _get(env, "CHATBOT_FEEDBACK_DIR"), _get(env, "CHATBOT_FEEDBACK_DATASET")
    if dataset is not None:
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", dataset):
            raise _bad("CHATBOT_FEEDBACK_DATASET", dataset, "a Hub dataset repo id owner/name")
        if (env.get("HF_HUB_OFFLINE") or "").strip().lower() in ("1", "true", "yes", "on"):
            raise _bad("CHATBOT_FEEDBACK_DATASET", dataset, "unset while HF_HUB_OFFLINE=1 (pushing needs the Hub)")
        # One folder per process: CommitScheduler pushes the whole folder, so a shared one would push (and re-push)
        # the files of every other process on this machine.
        folder = folder or os.path.join(tempfile.gettempdir(), f"chatbot-feedback-{os.getpid()}-{os.urandom(4).hex()}")
    if folder is not None and os.path.exists(folder) and not os.path.isdir(folder):
        raise _bad("CHATBOT_FEEDBACK_DIR", folder, "a directory (created if missing), not a file")
    return {"feedback_dir": folder, "feedback_dataset": dataset,
            "feedback_max_mb": _number(env, "CHATBOT_FEEDBACK_MAX_MB", int, 200, lo=1)}


def _arena(env: Mapping[str, str], model: str | None, gguf_file: str | None) -> dict:
    """CHATBOT_ARENA_MODEL / CHATBOT_ARENA_GGUF_FILE: the Arena's second model, by CHATBOT_MODEL's and
    CHATBOT_GGUF_FILE's rules (checked again when it loads); off unless set."""
    arena_model, arena_file = _get(env, "CHATBOT_ARENA_MODEL"), _get(env, "CHATBOT_ARENA_GGUF_FILE")
    if arena_file is not None and arena_model is None:
        raise _bad("CHATBOT_ARENA_GGUF_FILE", arena_file,
                   "a file name or glob inside CHATBOT_ARENA_MODEL, so CHATBOT_ARENA_MODEL must be set too")
    if arena_model is not None and (arena_model, arena_file) == (model, gguf_file):
        raise _bad("CHATBOT_ARENA_MODEL", arena_model, "a model other than the chat's CHATBOT_MODEL "
                   "(the Arena compares two), or unset for no Arena")
    return {"arena_model": arena_model, "arena_gguf_file": arena_file}


def arena_settings(settings: Settings) -> Settings | None:
    """The Arena's second model as settings of its own: the chat's, served by the same backend kind, with
    CHATBOT_ARENA_MODEL / CHATBOT_ARENA_GGUF_FILE as the model, no adapter, and no prompt cache (a battle is one
    turn, never continued). None when the Arena is off."""
    if settings.arena_model is None:
        return None
    return replace(settings, model=settings.arena_model, gguf_file=settings.arena_gguf_file, adapter=None,
                   cache_mb=0, arena_model=None, arena_gguf_file=None)


def _parallel(env: Mapping[str, str], backend: str) -> int:
    """CHATBOT_PARALLEL: how many conversations the llama_cpp backend decodes at once (default: Settings.parallel,
    chosen by benchmarks/bench_visitors.py); the other backends ignore it, and refuse it set above 1."""
    value = _number(env, "CHATBOT_PARALLEL", int, Settings.parallel, lo=1, hi=MAX_PARALLEL)
    if value > 1 and backend != "llama_cpp" and _get(env, "CHATBOT_PARALLEL") is not None:
        raise _bad("CHATBOT_PARALLEL", env["CHATBOT_PARALLEL"], "1 (or unset) with CHATBOT_BACKEND=" + backend
                   + "; batched decoding is the llama_cpp backend's")
    return value


def load_settings(env: Mapping[str, str] = os.environ) -> Settings:
    backend = (_get(env, "CHATBOT_BACKEND") or "llama_cpp").lower().replace("-", "_")
    if backend not in BACKEND_NAMES:
        raise _bad("CHATBOT_BACKEND", env["CHATBOT_BACKEND"], ", ".join(BACKEND_NAMES))

    model = _get(env, "CHATBOT_MODEL")
    gguf_file = _get(env, "CHATBOT_GGUF_FILE")
    adapter = _get(env, "CHATBOT_ADAPTER")
    if gguf_file is not None and model is None:
        raise _bad("CHATBOT_GGUF_FILE", gguf_file,
                   "a file name or glob inside CHATBOT_MODEL, so CHATBOT_MODEL must be set too")
    if adapter is not None and backend != "transformers":
        raise _bad("CHATBOT_ADAPTER", adapter, "a PEFT adapter only with CHATBOT_BACKEND=transformers "
                   "(for llama_cpp merge it and export a GGUF)")

    device = (_get(env, "CHATBOT_DEVICE") or "auto").lower()
    if device not in DEVICE_NAMES:
        raise _bad("CHATBOT_DEVICE", env["CHATBOT_DEVICE"], ", ".join(DEVICE_NAMES))
    if device == "cuda" and backend != "transformers":
        raise _bad("CHATBOT_DEVICE", env["CHATBOT_DEVICE"], "auto or cpu with CHATBOT_BACKEND=" + backend
                   + " (only the transformers backend runs on a GPU)")

    base_url = _get(env, "CHATBOT_OPENAI_BASE_URL") or DEFAULT_OPENAI_BASE_URL
    if not base_url.startswith(("http://", "https://")):
        raise _bad("CHATBOT_OPENAI_BASE_URL", base_url, "an http:// or https:// URL, e.g. " + DEFAULT_OPENAI_BASE_URL)

    n_ctx = _number(env, "CHATBOT_N_CTX", int, 4096, lo=0)
    max_new_tokens = _number(env, "CHATBOT_MAX_NEW_TOKENS", int, 512, lo=1)
    if n_ctx and max_new_tokens >= n_ctx:
        raise _bad("CHATBOT_MAX_NEW_TOKENS", str(max_new_tokens),
                   f"an integer >= 1 and below CHATBOT_N_CTX={n_ctx}, leaving room for the prompt")

    return Settings(
        backend=backend,
        model=model,
        gguf_file=gguf_file,
        adapter=adapter,
        device=device,
        revision=_get(env, "CHATBOT_REVISION"),
        # Not stripped of inner whitespace, but an explicitly empty value means "no system prompt".
        system_prompt=env.get("CHATBOT_SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT).strip(),
        max_new_tokens=max_new_tokens,
        temperature=_number(env, "CHATBOT_TEMPERATURE", float, 0.2, lo=0, hi=2),
        top_p=_number(env, "CHATBOT_TOP_P", float, 0.9, lo=0, hi=1, lo_open=True),
        min_p=_number(env, "CHATBOT_MIN_P", float, 0.05, lo=0, hi=1),
        repeat_penalty=_number(env, "CHATBOT_REPEAT_PENALTY", float, 1.2, lo=1, hi=2),
        seed=_number(env, "CHATBOT_SEED", int, None, lo=0),
        n_ctx=n_ctx,
        threads=_number(env, "CHATBOT_THREADS", int, default_threads(env), lo=1),
        max_input_chars=_number(env, "CHATBOT_MAX_INPUT_CHARS", int, 8000, lo=1),
        max_system_chars=_number(env, "CHATBOT_MAX_SYSTEM_CHARS", int, 8000, lo=0),
        max_history_chars=_number(env, "CHATBOT_MAX_HISTORY_CHARS", int, 32000, lo=0),
        openai_base_url=base_url.rstrip("/"),
        openai_api_key=_get(env, "OPENAI_API_KEY") or "sk-no-key-required",
        mock_delay=_number(env, "CHATBOT_MOCK_DELAY", float, 0.05, lo=0, hi=60),
        mock_reply=_get(env, "CHATBOT_MOCK_REPLY"),
        llama_repack=_flag(env, "CHATBOT_LLAMA_REPACK", False),
        cache_mb=_number(env, "CHATBOT_CACHE_MB", int, 1024, lo=0),
        parallel=_parallel(env, backend),
        **_feedback(env),
        **_arena(env, model, gguf_file),
    )
