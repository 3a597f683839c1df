"""Reading the raw rows of a source: local .jsonl/.json/.csv/.parquet files, ConvoKit corpus dirs, saved datasets
and Hub ids (through `datasets`)."""
from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.data.config import SourceConfig
from training.data.errors import DataError
from training.data.json_rows import read_json_rows
from training.paths import resolve_repo_path

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def source_name(src: SourceConfig) -> str:
    name = Path(src.path).name if _is_local(src.path) else src.path
    return f"{name}:{src.subset}" if src.subset else name


def _is_local(path: str) -> bool:
    return resolve_repo_path(path).exists() or path.lower().endswith(LOCAL_SUFFIXES)


@dataclass
class SourceRows:
    rows: list[Any]              # dicts, or None for a JSON Lines line that is not JSON
    salvaged: int | None = None  # records kept from a broken JSON document (salvage_truncated), else None


def read_source(src: SourceConfig, salvage: bool = False) -> SourceRows:
    """Raw rows of a source; `salvage` keeps the complete records of a cut-off JSON document instead of failing."""
    path = resolve_repo_path(src.path)
    salvaged = None
    if src.path.lower().endswith(LOCAL_SUFFIXES):
        if not path.is_file():
            raise DataError(f"source path {src.path!r} not found (a local .jsonl/.json/.csv/.parquet file, "
                            "a dataset directory, or a Hub dataset id)")
        rows, salvaged = read_file(path, src.max_rows, salvage)
    elif (path / "utterances.jsonl").is_file():  # a ConvoKit corpus directory
        rows, salvaged = read_file(path / "utterances.jsonl", src.max_rows, salvage)
    else:
        rows = read_dataset(src)
    if src.max_rows is not None:
        rows = rows[: src.max_rows]
    return SourceRows(rows, salvaged)


def read_rows(src: SourceConfig) -> list[Any]:
    """Raw rows of a source: dicts, or None for a .jsonl line that is not JSON."""
    return read_source(src).rows


def read_file(path: Path, max_rows: int | None, salvage: bool = False) -> tuple[list[Any], int | None]:
    """(rows, salvaged) of one local file; .json and .jsonl are read by their first bytes (training.data.json_rows)."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return read_json_rows(path, max_rows, salvage)
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f)), None
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist(), None


def read_dataset(src: SourceConfig) -> list[dict]:
    """A dataset directory (saved with save_to_disk, or a folder of data files) or a Hub id, through `datasets`."""
    import datasets

    path = resolve_repo_path(src.path)
    split = src.split
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"split {split!r} not in {src.path!r}; accepted: {', '.join(ds)}")
                ds = ds[split]
        elif src.max_rows is not None and "[" not in split:
            # Streaming reads only the shards the first max_rows rows live in; split slicing ("train[:N]")
            # would download the whole data set first (gigabytes for OpenOrca).
            ds = datasets.load_dataset(str(path) if path.exists() else src.path, src.subset, split=split,
                                       streaming=True)
            return [dict(row) for row in itertools.islice(ds, src.max_rows)]
        else:
            ds = datasets.load_dataset(str(path) if path.exists() else src.path, src.subset, split=split)
        return ds.to_list()
    except DataError:
        raise
    except Exception as e:  # network, unknown id, bad split: say which source, keep the library's reason
        raise DataError(f"could not load source {src.path!r} (subset={src.subset!r}, split={split!r}) "
                        f"with datasets: {type(e).__name__}: {e}") from e
