"""Training data: read any supported shape, normalise to openai-style `messages`, clean, mix, split, report.

    read.py       raw rows of a file / dataset dir / Hub id
    formats.py    row shapes -> messages (one converter per format) and the conversation check
    dialogue.py   utterance-per-row corpora -> multi-turn windows
    normalise.py  one source's rows -> conversations, malformed rows counted by reason
    dedup.py      exact and near-duplicate removal
    mix.py        held-out split and weighted mixing
    report.py     data_report.json and data_lengths.png
    pipeline.py   prepare_data, the whole pipeline; cli.py its preview command (python -m training.data)
"""
from training.data.cli import main
from training.data.config import DataConfig, SourceConfig, data_config_from_dict
from training.data.dedup import exact_dedup_mask, near_dedup_mask, normalised_text
from training.data.errors import DROP_REASONS, DataError, Drop
from training.data.formats import FORMATS, ROW_FORMATS, detect_format, validate
from training.data.mix import mix_counts, take
from training.data.normalise import normalise_source
from training.data.pipeline import load_conversations, prepare_data, token_lengths
from training.data.read import read_rows, source_name
from training.data.report import DataReport, PreparedData, SourceReport

__all__ = [
    "DROP_REASONS", "FORMATS", "ROW_FORMATS", "DataConfig", "DataError", "DataReport", "Drop", "PreparedData",
    "SourceConfig", "SourceReport", "data_config_from_dict", "detect_format", "exact_dedup_mask", "load_conversations",
    "main", "mix_counts", "near_dedup_mask", "normalise_source", "normalised_text", "prepare_data", "read_rows",
    "source_name", "take", "token_lengths", "validate",
]
