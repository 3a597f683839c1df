"""Where the repository is, and recipe paths resolved against it (recipes name repo files such as
`training/samples/sample.jsonl`, and must work from any working directory)."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_repo_path(path: str | Path) -> Path:
    """The path as given when it exists (or is absolute), else relative to the repository when it exists there."""
    p = Path(path).expanduser()
    if not p.exists() and not p.is_absolute() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    return p
