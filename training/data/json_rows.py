"""JSON and JSON Lines files -> rows, whatever the suffix says: the first bytes decide. A JSON document that does
not parse is one clear error naming the file, the position and the likely cause; with salvage, the complete
records before the break are kept instead."""
from __future__ import annotations

import json
import re
from itertools import islice
from pathlib import Path
from typing import Any

from training.data.errors import DataError

_WS = re.compile(r"[ \t\n\r]*")
SALVAGE_HINT = "set data.salvage_truncated: true (preview: --salvage-truncated)"


def read_jsonl(path: Path, max_rows: int | None) -> list[Any]:
    """One row per non-empty line; None for a line that is not JSON (counted as invalid_json later)."""
    rows: list[Any] = []
    with path.open(encoding="utf-8-sig") as f:
        for line in f:
            if max_rows is not None and len(rows) >= max_rows:
                break
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    rows.append(None)
    return rows


def _is_json_lines(path: Path, first: bytes) -> bool:
    """JSON Lines unless the file opens an array, or opens an object that its first lines do not close; one
    object on one line is a row of a .jsonl file and a document ({"data": [...]} or one row) of a .json file."""
    if first == b"[":
        return False
    if first != b"{":
        return True
    with path.open(encoding="utf-8-sig") as f:
        lines = list(islice((ln for ln in f if ln.strip()), 3))
    if len(lines) < 2:
        return path.suffix.lower() == ".jsonl"
    for line in lines:
        try:
            if isinstance(json.loads(line), dict):
                return True
        except json.JSONDecodeError:
            continue
    return False


def rows_of(data: Any) -> list[Any]:
    """The records of a parsed document: an array, the one array of objects inside an object ({"data": [...]}),
    or a single object."""
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
        return lists[0] if len(lists) == 1 else [data]
    return list(data) if isinstance(data, list) else [data]


def _array_items(text: str, i: int, decoder: json.JSONDecoder) -> list[Any]:
    """The complete items of the array opening at text[i] ('['), up to the first one that does not parse."""
    items: list[Any] = []
    i = _WS.match(text, i + 1).end()
    while i < len(text) and text[i] != "]":
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break
        items.append(item)
        i = _WS.match(text, i).end()
        if text[i:i + 1] != ",":
            break
        i = _WS.match(text, i + 1).end()
    return items


def salvage_records(text: str) -> list[Any]:
    """The complete records before the break of a broken document: items of a top-level array, or of the first
    array of objects inside a top-level object."""
    decoder = json.JSONDecoder()
    i = _WS.match(text).end()
    if text.startswith("[", i):
        return _array_items(text, i, decoder)
    if not text.startswith("{", i):
        return []
    i = _WS.match(text, i + 1).end()
    while text.startswith('"', i):
        i = _skip_value(text, i, decoder, ":")  # the key
        if i is None:
            return []
        if text.startswith("[", i):
            items = _array_items(text, i, decoder)
            if items and isinstance(items[0], dict):
                return items
        i = _skip_value(text, i, decoder, ",")
        if i is None:
            return []
    return []


def _skip_value(text: str, i: int, decoder: json.JSONDecoder, separator: str) -> int | None:
    """The position after the value at text[i] and the `separator` that must follow it; None if either is missing."""
    try:
        _, i = decoder.raw_decode(text, i)
    except json.JSONDecodeError:
        return None
    i = _WS.match(text, i).end()
    if not text.startswith(separator, i):
        return None
    return _WS.match(text, i + 1).end()


def describe_json_error(name: str, text: str, error: json.JSONDecodeError, complete: int) -> str:
    """One line: where the document breaks and the likely cause."""
    end = len(text.rstrip())
    if error.msg.startswith("Unterminated string") or error.pos >= end:
        line = text.count("\n", 0, end) + 1
        column = end - (text.rfind("\n", 0, end) + 1)  # of the last character
        return (f"{name} is not valid JSON: it ends inside a value at line {line}, column {column} "
                f"(byte {len(text.encode('utf-8'))}): was the download cut off? Download it again, or "
                f"{SALVAGE_HINT} to keep the {complete} complete records before the cut")
    byte = len(text[:error.pos].encode("utf-8"))
    return (f"{name} is not valid JSON at line {error.lineno}, column {error.colno} (byte {byte}): {error.msg}; "
            f"fix the file there, or {SALVAGE_HINT} to keep the {complete} complete records before it")


def read_json_rows(path: Path, max_rows: int | None, salvage: bool = False) -> tuple[list[Any], int | None]:
    """(rows, salvaged): salvaged is the number of records kept from a broken document, None when it parsed."""
    with path.open("rb") as f:
        head = f.read(1024).lstrip(b"\xef\xbb\xbf \t\r\n")
    if _is_json_lines(path, head[:1]):
        return read_jsonl(path, max_rows), None
    text = path.read_text(encoding="utf-8-sig")
    try:
        rows = rows_of(json.loads(text))
        salvaged = None
    except json.JSONDecodeError as e:
        rows = salvage_records(text)
        if not salvage:
            raise DataError(describe_json_error(path.name, text, e, len(rows))) from None
        salvaged = len(rows)
    return (rows if max_rows is None else rows[:max_rows]), salvaged
