"""Typed data options: one SourceConfig per data set, one DataConfig for the mix (the recipe's `data:` section)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from training.data.errors import DataError


@dataclass
class SourceConfig:
    path: str                        # local .jsonl/.json/.csv/.parquet file or dataset dir, or a Hub dataset id
    format: str = "auto"             # auto | messages | sharegpt | alpaca | openorca | guanaco | dialogue
    split: str = "train"             # Hub split
    subset: str | None = None        # Hub config name
    weight: float = 1.0              # mixing weight: rows of this source appear weight x as often (0.5 = half of them)
    max_rows: int | None = None      # cap on rows read from this source
    assistant_speaker: str | None = None  # dialogue: the speaker played by the assistant; None = every speaker in turn
    window: int = 8                  # dialogue: utterances per training window
    system: str | None = None        # system prompt added to rows that have none; dialogue may use {speaker}
    repair: bool = True              # keep the usable part of messy conversations; false = drop them whole


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    dedup: bool = True                       # exact duplicates (normalised text) removed
    near_dedup: float | None = None          # Jaccard threshold for near-duplicates, e.g. 0.85; None = off
    min_score: float | None = None           # drop rows whose quality score (FineTome `score`) is below
    min_tokens: int | None = None            # length filter on the templated conversation, in tokens
    max_tokens: int | None = None
    validation_fraction: float = 0.05        # seeded held-out split...
    validation_path: str | None = None       # ...or a fixed held-out file (then no split is taken)
    max_rows: int | None = None              # cap on the training rows after mixing (quick runs, sweeps)
    seed: int = 42
    max_validation_rows: int | None = None   # cap on the held-out rows (keeps eval cheap on big data sets)
    salvage_truncated: bool = False          # a cut-off .json file: keep the complete records before the cut


def data_config_from_dict(values: dict) -> DataConfig:
    """DataConfig from plain YAML / JSON values; a source may be a bare path. Unknown keys are an error."""
    def build(cls, d: dict, where: str):
        if not isinstance(d, dict):
            raise DataError(f"{where}={d!r}; accepted: a mapping of {', '.join(f.name for f in fields(cls))}")
        accepted = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in accepted]
        if unknown:
            raise DataError(f"unknown option {where}.{unknown[0]}; accepted: {', '.join(accepted)}")
        try:
            return cls(**d)
        except TypeError as e:  # a required field (a source's path) is missing
            raise DataError(f"{where}: {e}; accepted: a mapping of {', '.join(accepted)}") from None

    values = dict(values)
    sources = values.pop("sources", [])
    if not isinstance(sources, list):
        raise DataError(f"data.sources={sources!r}; accepted: a list of paths / Hub ids or source mappings")
    cfg = build(DataConfig, values, "data")
    cfg.sources = [build(SourceConfig, {"path": s} if isinstance(s, str) else s, f"data.sources[{i}]")
                   for i, s in enumerate(sources)]
    return cfg
