"""prepare_data: read -> normalise and repair (malformed rows skipped, counted by reason) -> hold out validation
rows (per source, seeded; or a fixed file) -> min_score -> exact dedup -> near dedup -> drop train rows identical
to a validation row -> mix sources by weight up to max_rows, the costly steps (token lengths, long conversations
into windows that fit max_length, token-length filter) run only on the rows the mix needs -> report.

The validation rows are taken *before* the filters on purpose: every DataConfig variant over the same sources
(raw / dedup / filtered / mixed) is then scored on the very same held-out rows, so their eval losses compare.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict
from typing import Any, Callable

from training.data.config import DataConfig, SourceConfig
from training.data.dedup import digest, exact_dedup_mask, near_dedup_mask, normalised_text
from training.data.errors import DROP_REASONS, TRIM_REASONS, DataError
from training.data.formats import FORMATS
from training.data.mix import mix_processed, split_validation
from training.data.normalise import normalise_source
from training.data.read import read_source, source_name
from training.data.report import DataReport, PreparedData, SourceReport
from training.data.windows import fit_windows, token_lengths


def check_config(cfg: DataConfig, tokenizer, max_length: int | None = None) -> None:
    if not cfg.sources:
        raise DataError("DataConfig.sources is empty; accepted: a list of at least one source")
    for src in cfg.sources:
        if src.format not in FORMATS:
            raise DataError(f"format={src.format!r} for source {src.path!r}; accepted: {', '.join(FORMATS)}")
        if not (isinstance(src.weight, (int, float)) and src.weight >= 0):
            raise DataError(f"weight={src.weight!r} for source {src.path!r}; accepted: a number >= 0")
        if src.max_rows is not None and src.max_rows < 1:
            raise DataError(f"max_rows={src.max_rows!r} for source {src.path!r}; accepted: an integer >= 1 or null")
    if not 0 <= cfg.validation_fraction < 1:
        raise DataError(f"validation_fraction={cfg.validation_fraction!r}; accepted: 0 <= value < 1")
    if cfg.near_dedup is not None and not 0 < cfg.near_dedup <= 1:
        raise DataError(f"near_dedup={cfg.near_dedup!r}; accepted: a Jaccard threshold in (0, 1] or null")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise DataError(f"max_length={max_length!r}; accepted: an integer >= 2 or null")
    for key in ("max_rows", "max_validation_rows", "min_tokens", "max_tokens"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DataError(f"{key}={value!r}; accepted: an integer >= 1 or null")
    if (cfg.min_tokens or cfg.max_tokens) and tokenizer is None:
        raise DataError("min_tokens/max_tokens need a tokenizer: pass tokenizer= to prepare_data, or set both to null")


def window_long(examples: list[dict], srep: SourceReport, tokenizer, max_length: int) -> list[dict]:
    """Examples with each conversation longer than max_length replaced by its windows; counted in `srep`."""
    out = []
    for e in examples:
        windows = fit_windows(tokenizer, e["messages"], max_length, e["length"])
        if len(windows) > 1:
            srep.windowed += 1
            srep.windows_from_long += len(windows)
        srep.cut_at_max_length += sum(1 for _, n in windows if n > max_length)
        out.extend({**e, "messages": w, "length": n} for w, n in windows)
    return out


def prepare_data(cfg: DataConfig, tokenizer=None, log: Callable[[str], Any] | None = print,
                 max_length: int | None = None) -> PreparedData:
    """Load, normalise, clean, split and mix the sources of `cfg`; rows are {"messages": [...]} dicts.

    With a tokenizer and `max_length` (train.max_length), training conversations longer than max_length become
    windows of whole exchanges that fit (training.data.windows); held-out rows stay whole, so every tool scores
    the same rows.
    """
    log = log or (lambda _msg: None)
    check_config(cfg, tokenizer, max_length)
    report = DataReport(length_unit="tokens" if tokenizer is not None else "characters",
                        config=asdict(cfg), max_length=max_length if tokenizer is not None else None)
    drops: list[Counter] = []
    train_parts: list[list[dict]] = []
    validation: list[dict] = []

    for i, src in enumerate(cfg.sources):
        log(f"data: reading {source_name(src)}")
        read = read_source(src, salvage=cfg.salvage_truncated)
        counter: Counter = Counter()
        fmt, examples = normalise_source(src, read.rows, counter)
        srep = SourceReport(name=source_name(src), format=fmt, rows=len(read.rows), valid=len(examples),
                            salvaged=read.salvaged)
        if read.salvaged is not None:
            log(f"data: warning: {srep.name} is cut off or broken; salvaged the {read.salvaged} complete records "
                "before the break")
        srep.trimmed = sum(1 for e in examples if e["trims"])
        srep.whole = srep.valid - srep.trimmed
        trims = Counter(r for e in examples for r in e["trims"])
        srep.trimmed_by = {k: trims[k] for k in TRIM_REASONS if trims[k]}
        if cfg.validation_path is None:
            examples, held = split_validation(examples, cfg.validation_fraction,
                                              random.Random(f"{cfg.seed}/split/{i}"))
            validation.extend(held)
            srep.validation = len(held)
        if not examples:
            log(f"data: warning: source {srep.name} has no usable rows ({dict(counter) or 'it is empty'})")
        report.sources.append(srep)
        drops.append(counter)
        train_parts.append(examples)

    if cfg.validation_path is not None:
        vsrc = SourceConfig(path=cfg.validation_path)
        vdrops: Counter = Counter()
        _, validation = normalise_source(vsrc, read_source(vsrc, salvage=cfg.salvage_truncated).rows, vdrops)
        if vdrops:
            log(f"data: validation file {vsrc.path}: skipped " + ", ".join(f"{k} {v}" for k, v in vdrops.items()))
    if cfg.max_validation_rows is not None and len(validation) > cfg.max_validation_rows:
        validation = random.Random(f"{cfg.seed}/validation").sample(validation, cfg.max_validation_rows)

    # Filters, in order. Each sees the rows of all sources in source order, so cross-source duplicates go too.
    def apply(mask_fn: Callable[[list[dict]], list[bool]], reason: str) -> None:
        flat = [(s, e) for s, part in enumerate(train_parts) for e in part]
        mask = mask_fn([e for _, e in flat])
        for s in range(len(train_parts)):
            train_parts[s] = []
        for (s, e), ok in zip(flat, mask):
            if ok:
                train_parts[s].append(e)
            else:
                drops[s][reason] += 1

    if cfg.min_score is not None:
        apply(lambda ex: [e["score"] is None or e["score"] >= cfg.min_score for e in ex], "low_score")
        for srep, part in zip(report.sources, train_parts):
            if part and all(e["score"] is None for e in part):
                log(f"data: min_score: source {srep.name} has no score column; its rows are kept")
    if cfg.dedup:
        apply(lambda ex: exact_dedup_mask(normalised_text(e["messages"]) for e in ex), "duplicate")
    if cfg.near_dedup is not None:
        apply(lambda ex: near_dedup_mask([normalised_text(e["messages"]) for e in ex], cfg.near_dedup,
                                         seed=cfg.seed), "near_duplicate")
    if validation:  # never train on a held-out row, whatever the dedup options say
        seen = {digest(normalised_text(v["messages"])) for v in validation}
        apply(lambda ex: [digest(normalised_text(e["messages"])) not in seen for e in ex], "in_validation")

    def tokenised(s: int, examples: list[dict]) -> list[list[dict]]:
        """Per example, the training rows it becomes: token length, windows of max_length, token filters."""
        if tokenizer is None:
            return [[e] for e in examples]
        for e, n in zip(examples, token_lengths(tokenizer, [e["messages"] for e in examples])):
            e["length"] = n
        per_example = [window_long([e], report.sources[s], tokenizer, max_length) if max_length is not None else [e]
                       for e in examples]
        for reason, fits in (("too_short", lambda n: cfg.min_tokens is None or n >= cfg.min_tokens),
                             ("too_long", lambda n: cfg.max_tokens is None or n <= cfg.max_tokens)):
            kept = [[r for r in rows if fits(r["length"])] for rows in per_example]
            drops[s][reason] += sum(map(len, per_example)) - sum(map(len, kept))
            per_example = kept
        return per_example

    # The costly steps run only on what the mix needs: with max_rows below the total, each source is tokenised in a
    # seeded order until its share is filled (training.data.mix.mix_processed).
    mixed = mix_processed(train_parts, [s.weight for s in cfg.sources], cfg.max_rows, tokenised, cfg.seed)
    train: list[dict] = []
    for part, mix, srep, counter in zip(train_parts, mixed, report.sources, drops):
        srep.pool, srep.kept, srep.train = len(part), mix.kept, len(mix.rows)
        srep.processed = mix.processed if mix.processed < len(part) else None
        srep.dropped = {k: counter[k] for k in DROP_REASONS if counter[k]}
        train.extend(mix.rows)
    random.Random(f"{cfg.seed}/shuffle").shuffle(train)

    if not train:
        raise DataError("no usable training rows left; dropped by reason: "
                        + (", ".join(f"{k} {v}" for k, v in report.dropped.items()) or "none (the sources are empty)"))

    if tokenizer is not None:
        report.train_lengths = [e["length"] for e in train]
        report.validation_lengths = token_lengths(tokenizer, [v["messages"] for v in validation])
    else:
        report.train_lengths = [sum(len(m["content"]) for m in e["messages"]) for e in train]
        report.validation_lengths = [sum(len(m["content"]) for m in v["messages"]) for v in validation]
    report.train_rows, report.validation_rows = len(train), len(validation)
    log(report.summary())
    return PreparedData(train=[{"messages": e["messages"]} for e in train],
                        validation=[{"messages": v["messages"]} for v in validation], report=report)


def load_conversations(path: str, format: str = "auto") -> list[dict]:
    """Every valid conversation of one file / dataset, normalised, with no filtering (for evaluation and tools)."""
    src = SourceConfig(path=path, format=format)
    _, examples = normalise_source(src, read_source(src).rows, Counter())
    return [{"messages": e["messages"]} for e in examples]
