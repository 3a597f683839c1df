"""One source's raw rows -> conversations in the training shape; malformed rows counted by reason.

Each example is {"messages", "score", "trims" (the TRIM_REASONS repair applied; empty = kept whole), "row" (its
index among the source's rows)}.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from training.data.config import SourceConfig
from training.data.conversation import repair, validate
from training.data.dialogue import dialogue_windows
from training.data.errors import DataError, Drop
from training.data.formats import FORMAT_BY_NAME, FORMATS, detect_format, row_score, with_system
from training.data.read import source_name


def normalise_source(src: SourceConfig, rows: list[Any], drops: Counter) -> tuple[str, list[dict]]:
    """Rows of one source -> (format, examples); malformed rows are counted in `drops`."""
    name = source_name(src)
    if src.format not in FORMATS:
        raise DataError(f"format={src.format!r} for source {name!r}; accepted: {', '.join(FORMATS)}")
    fmt = detect_format(rows, name) if src.format == "auto" else src.format
    drops["invalid_json"] += sum(1 for r in rows if not isinstance(r, dict))
    if fmt == "dialogue":
        if src.window < 2:
            raise DataError(f"window={src.window} for source {name!r}; accepted: an integer >= 2")
        windows = dialogue_windows(rows, src.assistant_speaker, src.window, src.system, drops, name)
        return fmt, [{"messages": m, "score": None, "trims": [], "row": None} for m in windows]
    shape = FORMAT_BY_NAME[fmt]
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            continue
        try:
            messages, trims = shape.convert(row), []
            if src.repair:
                messages, trims = repair(messages)
            else:
                validate(messages)
        except Drop as d:
            drops[d.reason] += 1
            continue
        out.append({"messages": with_system(messages, src.system), "score": row_score(row), "trims": trims,
                    "row": i})
    return fmt, out
