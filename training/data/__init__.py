"""Training data: read any supported shape, normalise to openai-style `messages`, clean, mix, split, report.

    config.py        typed options (the recipe's data: section); errors.py what can go wrong, by reason
    read.py          raw rows of a file / dataset dir / Hub id; json_rows.py JSON / JSON Lines, cut-off files
    formats.py       row shapes -> turns (the format registry) and the role alias table
    conversation.py  the training shape: repair (keep what is usable) or validate (strict)
    dialogue.py      utterance-per-row corpora -> multi-turn windows
    normalise.py     one source's rows -> conversations, malformed rows counted by reason
    dedup.py         exact and near-duplicate removal
    mix.py           held-out split and weighted mixing (the costly steps only on the rows the mix takes)
    windows.py       token lengths; long conversations -> windows that fit max_length
    report.py        data_report.json and data_lengths.png
    pipeline.py      prepare_data, the whole pipeline; cli.py its preview command (python -m training.data)
"""
from training.data.cli import main
from training.data.config import DataConfig, SourceConfig, data_config_from_dict
from training.data.dedup import exact_dedup_mask, near_dedup_mask, normalised_text
from training.data.conversation import repair, validate
from training.data.errors import DROP_REASONS, TRIM_REASONS, DataError, Drop
from training.data.formats import FORMAT_REGISTRY, FORMATS, ROLE_ALIASES, RowFormat, detect_format
from training.data.mix import MixedSource, mix_counts, mix_processed, take
from training.data.normalise import normalise_source
from training.data.pipeline import load_conversations, prepare_data
from training.data.read import read_rows, read_source, source_name
from training.data.report import DataReport, PreparedData, SourceReport
from training.data.windows import fit_windows, token_lengths

__all__ = [
    "DROP_REASONS", "FORMATS", "FORMAT_REGISTRY", "ROLE_ALIASES", "TRIM_REASONS", "DataConfig", "DataError",
    "DataReport", "Drop", "MixedSource", "PreparedData", "RowFormat", "SourceConfig", "SourceReport",
    "data_config_from_dict", "detect_format", "exact_dedup_mask", "fit_windows", "load_conversations", "main",
    "mix_counts", "mix_processed", "near_dedup_mask", "normalise_source", "normalised_text", "prepare_data",
    "read_rows", "read_source", "repair", "source_name", "take", "token_lengths", "validate",
]
