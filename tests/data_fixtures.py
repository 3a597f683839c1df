"""Shared by the training.data tests: message builders, a JSON Lines writer and prepare_data on one source."""
from __future__ import annotations

import json
from pathlib import Path

from training.data import DataConfig, SourceConfig, prepare_data

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "training" / "samples" / "sample.jsonl"


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def write_jsonl(path: Path, rows, raw_lines=()) -> str:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def prep(path, fmt="auto", tokenizer=None, max_length=None, **cfg):
    """prepare_data on one source with every option off unless asked for."""
    source_keys = {"assistant_speaker", "window", "system", "weight", "split", "repair"}
    src_kw = {k: cfg.pop(k) for k in list(cfg) if k in source_keys}
    cfg.setdefault("dedup", False)
    cfg.setdefault("validation_fraction", 0.0)
    return prepare_data(DataConfig(sources=[SourceConfig(path=str(path), format=fmt, **src_kw)], **cfg),
                        tokenizer=tokenizer, log=None, max_length=max_length)


def drops(result):
    return result.report.sources[0].dropped


def qa_rows(n, prefix="Question"):
    return [{"messages": [U(f"{prefix} number {i} about topic {i * 7 % 13}?"),
                          A(f"Answer {i}: " + " ".join(f"w{(i * j) % 97}" for j in range(12)))]} for i in range(n)]
