"""User mistakes as one line naming what to change; finetune.py prints it and exits 2. Anything else is a bug
and keeps its traceback.

The library errors come wrapped: transformers turns huggingface_hub's GatedRepoError / RepositoryNotFoundError /
LocalEntryNotFoundError into an OSError raised `from` them, so the whole cause chain is searched.
"""
from __future__ import annotations

from typing import Iterator

USAGE_EXIT = 2


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _repo(exc: BaseException, cfg) -> str:
    repo = getattr(exc, "repo_id", None)
    return repo or (cfg.model.name_or_path if cfg is not None else "the model")


def _oom(cfg) -> str:
    if cfg is None:
        return "out of GPU memory: lower train.per_device_train_batch_size or train.max_length, or use model.mode=qlora"
    t, m = cfg.train, cfg.model
    hints = [f"train.per_device_train_batch_size={max(1, t.per_device_train_batch_size // 2)} "
             f"(with train.gradient_accumulation_steps={t.gradient_accumulation_steps * 2})"
             if t.per_device_train_batch_size > 1 else None,
             f"train.max_length={max(128, t.max_length // 2)}" if t.max_length > 256 else None,
             "model.gradient_checkpointing=true" if not m.gradient_checkpointing else None,
             "model.mode=qlora" if m.mode in ("lora", "bf16", "fp32") else None]  # auto is qlora on a GPU already
    return "out of GPU memory: try " + " or ".join(h for h in hints if h)


def explain(exc: BaseException, cfg=None) -> str | None:
    """The one line to show for a user mistake, or None when `exc` is not one (a bug: let it raise)."""
    import torch
    from huggingface_hub import errors as hub

    from training.chat_format import TemplateError
    from training.config import ConfigError
    from training.data import DataError
    from training.export.merge import MergeError
    from training.trainer.hardware import PlanError

    chain = list(_chain(exc))
    push = cfg.hub.push_to_hub if cfg is not None else None
    pushing = push and any("/api/repos/create" in str(e) or getattr(e, "repo_id", None) == push or push in str(e)
                           for e in chain)
    for e in chain:
        if pushing and isinstance(e, (hub.HfHubHTTPError, ConnectionError)):
            status = getattr(getattr(e, "response", None), "status_code", None)
            why = f"HTTP {status}" if status else "offline (HF_HUB_OFFLINE=1)" if isinstance(
                e, hub.OfflineModeIsEnabled) else "no connection"
            return (f"upload to hub.push_to_hub={push} failed ({why}): set HF_TOKEN to a token with write access and "
                    f"go online; the trained files are in {cfg.train.output_dir}")
        if isinstance(e, (ConfigError, PlanError, DataError, TemplateError, MergeError)):
            return _one_line(e)
        if isinstance(e, torch.OutOfMemoryError):  # the CUDA caching allocator's (torch.cuda.OutOfMemoryError)
            return _oom(cfg)
        if isinstance(e, hub.GatedRepoError):
            return (f"{_repo(e, cfg)} is gated: accept its licence on https://huggingface.co/{_repo(e, cfg)} and set "
                    "HF_TOKEN to a token of that account (or pick another model.name_or_path)")
        if isinstance(e, hub.RepositoryNotFoundError):
            return (f"{_repo(e, cfg)} is not a local folder nor a Hub repo this token can read: check "
                    "model.name_or_path (a private repo needs HF_TOKEN)")
        if isinstance(e, hub.RevisionNotFoundError):
            return f"{_repo(e, cfg)}: revision not found on the Hub; check the repo's branches"
        if isinstance(e, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled)):
            return (f"{_repo(e, cfg)} is not in the local Hugging Face cache and the Hub cannot be reached "
                    "(offline, or HF_HUB_OFFLINE=1): download it once online, or set model.name_or_path to a local "
                    "folder")
        if isinstance(e, hub.HfHubHTTPError) and getattr(e.response, "status_code", None) in (401, 403):
            return (f"the Hub refused access (HTTP {e.response.status_code}) to {_repo(e, cfg)}: set HF_TOKEN to a "
                    "token with access (write access for hub.push_to_hub)")
        if isinstance(e, hub.HFValidationError):
            name = cfg.model.name_or_path if cfg is not None else "the model"
            return f"model.name_or_path={name!r} is neither a local folder nor a Hub repo id (owner/name)"
        if isinstance(e, ConnectionError) or type(e).__name__ in ("ConnectError", "ConnectTimeout"):
            return ("cannot reach the Hugging Face Hub: check the network, or set HF_HUB_OFFLINE=1 to use only the "
                    "local cache")
        if isinstance(e, ValueError) and "trust_remote_code" in str(e):
            return "this model ships its own modelling code: set model.trust_remote_code=true if you trust it"
        if isinstance(e, ValueError) and str(e).startswith("Target modules") and "not found" in str(e):
            return (f"lora.target_modules={cfg.lora.target_modules if cfg else '?'} names no layer of this model: "
                    "use all-linear or its layer names (e.g. q_proj,v_proj)")
    return None
