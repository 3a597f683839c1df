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


def resolve_recipe_paths(cfg) -> None:
    """In place: a recipe's data files (`cfg.data.sources`, `cfg.data.validation_path`) become repository paths
    where that is where they are, so the run's saved config.yaml and model card name real files."""
    data = cfg.data
    for src in data.sources:
        if resolve_repo_path(src.path) != Path(src.path).expanduser():
            src.path = str(resolve_repo_path(src.path))
    if data.validation_path and resolve_repo_path(data.validation_path) != Path(data.validation_path).expanduser():
        data.validation_path = str(resolve_repo_path(data.validation_path))


def recipe_of(source: str) -> Path | None:
    """The recipe a --data / --preference-data value names: a recipe YAML, or a run dir's config.yaml."""
    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.yaml").is_file():
        return path / "config.yaml"
    return path if path.suffix in (".yaml", ".yml") else None
