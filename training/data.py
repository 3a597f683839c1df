"""Data: load raw rows in any supported shape, normalise to openai-style `messages`, clean, mix, split, report.

(Contract stub written by the lead; the data engineer owns this file and fills in the implementation.)
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SourceConfig:
    path: str                        # local .jsonl/.json/.csv/.parquet file, or a Hub dataset id
    format: str = "auto"             # auto | messages | sharegpt | alpaca | openorca | guanaco | dialogue
    split: str = "train"             # Hub split
    subset: str | None = None        # Hub config name
    weight: float = 1.0              # mixing weight relative to the other sources
    max_rows: int | None = None      # cap on rows read from this source
    assistant_speaker: str | None = None  # dialogue: the speaker played by the assistant; None = every speaker in turn
    window: int = 8                  # dialogue: utterances per training window


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
