"""Data: load raw rows in any supported shape, normalise to openai-style `messages`, clean, mix, split, report.

Pipeline of `prepare_data` (each data-centric step is its own option and can be switched off):

    read rows (local file / dir / Hub id)  ->  normalise + validate (malformed rows skipped, counted by reason)
    ->  hold out validation rows (per source, seeded; or a fixed file)
    ->  min_score  ->  exact dedup  ->  near dedup  ->  token-length filter
    ->  drop train rows identical to a validation row  ->  mix sources by weight  ->  max_rows  ->  report

The validation rows are taken *before* the filters on purpose: every DataConfig variant over the same sources
(raw / dedup / filtered / mixed) is then scored on the very same held-out rows, so their eval losses compare.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import random
import re
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "openorca", "guanaco", "dialogue")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
REPO_ROOT = Path(__file__).resolve().parent.parent

# Every reason a row can be dropped for, in the order the checks run. Tests and the report use these names.
DROP_REASONS = {
    "invalid_json": "a line / item that is not a JSON object",
    "missing_field": "a required field is absent or null",
    "bad_type": "a field has the wrong type (e.g. a turn's text is not a string)",
    "unparsable_text": "guanaco text without '### Human:' / '### Assistant:' markers, or text before the first one",
    "empty_turn": "a turn whose text is empty or whitespace",
    "unknown_role": "a role outside system/user/assistant (and the format's aliases)",
    "multiple_system": "more than one system message",
    "system_not_first": "a system message after the first turn",
    "no_assistant_turn": "no assistant turn at all",
    "not_starting_with_user": "the first non-system turn is not the user's",
    "not_alternating": "two user or two assistant turns in a row",
    "not_ending_in_assistant": "the last turn is not the assistant's",
    "low_score": "quality score below min_score",
    "duplicate": "exact duplicate (case and whitespace ignored) of an earlier row",
    "near_duplicate": "Jaccard similarity of character shingles >= near_dedup with an earlier row",
    "too_short": "fewer templated tokens than min_tokens",
    "too_long": "more templated tokens than max_tokens",
    "in_validation": "a training row identical to a validation row (leak)",
}


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


class DataError(ValueError):
    """Bad data options, an unreadable source, or no usable rows left."""


class Drop(Exception):
    """A malformed row; `reason` is a key of DROP_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------
# Reading


def source_name(src: SourceConfig) -> str:
    name = Path(src.path).name if _is_local(src.path) else src.path
    return f"{name}:{src.subset}" if src.subset else name


def _local_path(path: str) -> Path:
    """The path as given, or relative to the repository when that is where it exists (recipes name repo files)."""
    p = Path(path).expanduser()
    if not p.exists() and not p.is_absolute() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    return p


def _is_local(path: str) -> bool:
    return _local_path(path).exists() or path.lower().endswith(LOCAL_SUFFIXES)


def read_rows(src: SourceConfig) -> list[Any]:
    """Raw rows of a source: dicts, or None for a .jsonl line that is not JSON."""
    path = _local_path(src.path)
    if src.path.lower().endswith(LOCAL_SUFFIXES):
        if not path.is_file():
            raise DataError(f"source path {src.path!r} not found (a local .jsonl/.json/.csv/.parquet file, "
                            "a dataset directory, or a Hub dataset id)")
        rows = _read_file(path, src.max_rows)
    elif (path / "utterances.jsonl").is_file():  # a ConvoKit corpus directory
        rows = _read_file(path / "utterances.jsonl", src.max_rows)
    else:
        rows = _read_dataset(src)
    if src.max_rows is not None:
        rows = rows[: src.max_rows]
    return rows


def _read_jsonl(path: Path, max_rows: int | None) -> list[Any]:
    rows: list[Any] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if max_rows is not None and len(rows) >= max_rows:
                break
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    rows.append(None)
    return rows


def _read_file(path: Path, max_rows: int | None) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, max_rows)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:  # JSON Lines under a .json name
            return _read_jsonl(path, max_rows)
        if isinstance(data, dict):  # {"data": [...]} or a single row
            lists = [v for v in data.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
            data = lists[0] if len(lists) == 1 else [data]
        return list(data)
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _read_dataset(src: SourceConfig) -> list[dict]:
    """A dataset directory (saved with save_to_disk, or a folder of data files) or a Hub id, through `datasets`."""
    import datasets

    path = _local_path(src.path)
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


# ----------------------------------------------------------------------------------------------------------
# Normalisation: every shape -> [{"role", "content"}], or Drop(reason)

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}
MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
GUANACO_MARKER = re.compile(r"###\s*(Human|Assistant)\s*:")
DIALOGUE_ORDER_FIELDS = ("timestamp", "index", "order", "turn", "utterance_index")


def detect_format(rows: list[Any], name: str = "source") -> str:
    """Shape of a source from the columns of its first rows."""
    keys: set[str] = set()
    for row in rows[:100]:
        if isinstance(row, dict):
            keys.update(k for k, v in row.items() if v is not None)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"speaker", "text", "conversation_id"} <= keys:
        return "dialogue"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"question", "response"} <= keys:
        return "openorca"
    if "text" in keys:
        return "guanaco"
    raise DataError(f"cannot detect the format of {name} from its columns {sorted(keys)}; set format to one of "
                    f"{', '.join(FORMATS[1:])}")


def _text(value: Any) -> str:
    if value is None:
        raise Drop("missing_field")
    if isinstance(value, list):  # OpenAI content parts: [{"type": "text", "text": ...}]
        if not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
            raise Drop("bad_type")
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise Drop("bad_type")
    if not value.strip():
        raise Drop("empty_turn")
    return value.strip()


def _turns(value: Any) -> list:
    if isinstance(value, str):  # CSV cells hold nested lists as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise Drop("bad_type") from None
    if value is None:
        raise Drop("missing_field")
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise Drop("bad_type")
    if not value:
        raise Drop("no_assistant_turn")
    return value


def _field(row: dict, key: str) -> Any:
    if row.get(key) is None:
        raise Drop("missing_field")
    return row[key]


def _role_turns(turns: list[dict], role_key: str, text_key: str, aliases: dict[str, str]) -> list[dict]:
    # Roles are checked after every text so that a row counts under one reason whatever the order of its turns.
    raw = [(_field(t, role_key), _text(_field(t, text_key))) for t in turns]
    out = []
    for role, content in raw:
        role = aliases.get(str(role).strip().lower())
        if role is None:
            raise Drop("unknown_role")
        out.append({"role": role, "content": content})
    return out


def from_messages(row: dict) -> list[dict]:
    return _role_turns(_turns(_field(row, "messages")), "role", "content", MESSAGE_ROLES)


def from_sharegpt(row: dict) -> list[dict]:
    turns = _turns(_field(row, "conversations"))
    keys = ("from", "value") if any("from" in t for t in turns) else ("role", "content")
    return _role_turns(turns, *keys, SHAREGPT_ROLES)


def from_alpaca(row: dict) -> list[dict]:
    instruction, output = _text(_field(row, "instruction")), _text(_field(row, "output"))
    extra = row.get("input")
    prompt = f"{instruction}\n\n{extra.strip()}" if isinstance(extra, str) and extra.strip() else instruction
    system = row.get("system")
    head = [{"role": "system", "content": system.strip()}] if isinstance(system, str) and system.strip() else []
    return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def from_openorca(row: dict) -> list[dict]:
    question, response = _text(_field(row, "question")), _text(_field(row, "response"))
    system = row.get("system_prompt")
    head = [{"role": "system", "content": system.strip()}] if isinstance(system, str) and system.strip() else []
    return head + [{"role": "user", "content": question}, {"role": "assistant", "content": response}]


def from_guanaco(row: dict) -> list[dict]:
    text = _field(row, "text")
    if not isinstance(text, str):
        raise Drop("bad_type")
    parts = GUANACO_MARKER.split(text)  # [before, role, text, role, text, ...]
    if len(parts) < 3 or parts[0].strip():
        raise Drop("unparsable_text")
    return [{"role": "user" if who == "Human" else "assistant", "content": _text(body)}
            for who, body in zip(parts[1::2], parts[2::2])]


ROW_FORMATS: dict[str, Callable[[dict], list[dict]]] = {
    "messages": from_messages, "sharegpt": from_sharegpt, "alpaca": from_alpaca,
    "openorca": from_openorca, "guanaco": from_guanaco,
}


def validate(messages: list[dict]) -> None:
    """Raise Drop unless the conversation is [system] user assistant (user assistant)*."""
    roles = [m["role"] for m in messages]
    if roles.count("system") > 1:
        raise Drop("multiple_system")
    if "system" in roles[1:]:
        raise Drop("system_not_first")
    chat = roles[1:] if roles and roles[0] == "system" else roles
    if "assistant" not in chat:
        raise Drop("no_assistant_turn")
    if chat[0] != "user":
        raise Drop("not_starting_with_user")
    if any(a == b for a, b in zip(chat, chat[1:])):
        raise Drop("not_alternating")
    if chat[-1] != "assistant":
        raise Drop("not_ending_in_assistant")


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}] + messages
    return messages


def _score(row: dict) -> float | None:
    try:
        value = float(row.get("score"))
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def dialogue_windows(rows: list[Any], assistant_speaker: str | None, window: int, system: str | None,
                     drops: Counter, name: str = "source") -> list[list[dict]]:
    """Utterance rows (speaker, text, conversation_id, an order field) -> multi-turn windows.

    Each window ends at an utterance of the assistant speaker (or of every speaker in turn when none is chosen)
    and holds up to `window` utterances before it; the other speakers are the user, named in the text
    ("Ross: ..."), and consecutive turns of one role are merged.
    """
    # The first order field that holds values (ConvoKit leaves timestamp null in some corpora); else file order.
    order_key = next((k for k in DIALOGUE_ORDER_FIELDS
                      if any(isinstance(r, dict) and r.get(k) is not None for r in rows)), None)
    convs: dict[Any, list[tuple]] = defaultdict(list)
    for pos, row in enumerate(rows):
        if not isinstance(row, dict):
            continue  # counted as invalid_json by the caller
        try:
            speaker, conv = str(_field(row, "speaker")).strip(), _field(row, "conversation_id")
            text = _text(_field(row, "text"))
            order = _field(row, order_key) if order_key else pos
        except Drop as d:
            drops[d.reason] += 1
            continue
        if not speaker:
            drops["missing_field"] += 1
            continue
        convs[conv].append((order, pos, speaker, text))

    wanted = assistant_speaker.strip().lower() if assistant_speaker else None
    if wanted and not any(u[2].lower() == wanted for us in convs.values() for u in us):
        seen = Counter(u[2] for us in convs.values() for u in us).most_common(8)
        raise DataError(f"assistant_speaker {assistant_speaker!r} never speaks in {name}; "
                        f"most frequent speakers: {', '.join(s for s, _ in seen)}")
    out = []
    for utts in convs.values():
        try:
            utts.sort(key=lambda u: (u[0], u[1]))
        except TypeError:
            raise DataError(f"order field {order_key!r} of {name} mixes types; accepted: all numbers or all "
                            "strings") from None
        for i, (_, _, speaker, _) in enumerate(utts):
            if (wanted or speaker.lower()) != speaker.lower():
                continue
            me = speaker.lower()
            messages: list[dict] = []
            for _, _, who, text in utts[max(0, i - window + 1): i + 1]:
                role = "assistant" if who.lower() == me else "user"
                content = text if role == "assistant" else f"{who}: {text}"
                if messages and messages[-1]["role"] == role:
                    messages[-1]["content"] += "\n" + content
                else:
                    messages.append({"role": role, "content": content})
            if messages[0]["role"] == "assistant":
                messages = messages[1:]
            if messages:  # empty when the speaker opens the conversation: no context to answer
                out.append(_with_system(messages, system.replace("{speaker}", speaker) if system else None))
    return out


def normalise_source(src: SourceConfig, rows: list[Any], drops: Counter) -> tuple[str, list[dict]]:
    """Rows of one source -> (format, examples {"messages", "score"}); malformed rows are counted in `drops`."""
    name = source_name(src)
    if src.format not in FORMATS:
        raise DataError(f"format={src.format!r} for source {name!r}; accepted: {', '.join(FORMATS)}")
    fmt = detect_format(rows, name) if src.format == "auto" else src.format
    drops["invalid_json"] += sum(1 for r in rows if not isinstance(r, dict))
    if fmt == "dialogue":
        if src.window < 2:
            raise DataError(f"window={src.window} for source {name!r}; accepted: an integer >= 2")
        windows = dialogue_windows(rows, src.assistant_speaker, src.window, src.system, drops, name)
        return fmt, [{"messages": m, "score": None} for m in windows]
    convert = ROW_FORMATS[fmt]
    out = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        try:
            messages = _with_system(convert(row), src.system)
            validate(messages)
        except Drop as d:
            drops[d.reason] += 1
            continue
        out.append({"messages": messages, "score": _score(row)})
    return fmt, out


# ----------------------------------------------------------------------------------------------------------
# Data-centric filters


def normalised_text(messages: list[dict]) -> str:
    """The identity of a conversation for dedup: roles and texts, case and whitespace folded."""
    return "\x1e".join(f"{m['role']}\x1f{' '.join(m['content'].lower().split())}" for m in messages)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def exact_dedup_mask(texts: Iterable[str], seen: set[bytes] | None = None) -> list[bool]:
    """True for the first occurrence of each text (and for none already in `seen`)."""
    seen = set() if seen is None else seen
    keep = []
    for t in texts:
        d = _digest(t)
        keep.append(d not in seen)
        seen.add(d)
    return keep


def _shingle_hashes(text: str, k: int):
    """Distinct 32-bit hashes of the character k-shingles of `text`, vectorised (deterministic, no hash seed)."""
    import numpy as np

    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) < k:
        codes = np.concatenate([codes, np.zeros(k - len(codes), dtype=np.uint64)])
    h = np.zeros(len(codes) - k + 1, dtype=np.uint64)
    for j in range(k):  # polynomial hash, wrapping in uint64 on purpose
        h = h * np.uint64(1_000_003) + codes[j: len(codes) - k + 1 + j]
    return np.unique(h >> np.uint64(32))


def _lsh_shape(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) with the highest S-curve threshold (1/b)^(1/r) at most threshold - 0.1.

    Pairs at the threshold then become candidates with high probability (recall); false candidates only cost
    a signature comparison.
    """
    options = [(num_perm // r, r) for r in range(1, num_perm + 1)]
    below = [br for br in options if (1 / br[0]) ** (1 / br[1]) <= threshold - 0.1]
    return max(below, key=lambda br: (1 / br[0]) ** (1 / br[1])) if below else (num_perm, 1)


def minhash_signature(text: str, a, b, shingle: int = 5):
    """For each of the len(a) hash functions, the min over the shingles of multiply-shift hashing
    (a*h + b mod 2^64) >> 32 (a odd). The shift is monotone, so it is applied once, after the min."""
    import numpy as np

    h = _shingle_hashes(text, shingle)
    return ((h[:, None] * a + b).min(axis=0) >> np.uint64(32)).astype(np.uint32)


def near_dedup_mask(texts: list[str], threshold: float, num_perm: int = 128, shingle: int = 5,
                    seed: int = 0) -> list[bool]:
    """False for a text whose Jaccard similarity with an earlier kept text is >= threshold.

    MinHash signatures + LSH banding find candidates in O(n) with bucket dicts; a candidate counts only when
    its estimated Jaccard (share of equal signature slots) reaches the threshold.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64)
    bands, r = _lsh_shape(threshold, num_perm)
    buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(bands)]
    kept_sigs: list[Any] = []
    keep = []
    for text in texts:
        sig = minhash_signature(text, a, b, shingle)
        keys = [sig[i * r:(i + 1) * r].tobytes() for i in range(bands)]
        candidates = {j for band, key in zip(buckets, keys) for j in band.get(key, ())}
        dup = any(np.mean(kept_sigs[j] == sig) >= threshold for j in candidates)
        keep.append(not dup)
        if not dup:
            kept_sigs.append(sig)
            for band, key in zip(buckets, keys):
                band[key].append(len(kept_sigs) - 1)
    return keep


def token_lengths(tokenizer, conversations: list[list[dict]], batch: int = 256) -> list[int]:
    """Tokens of each conversation rendered with the tokenizer's own chat template (as training sees it)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat_template; set the recipe's template on it before prepare_data "
                        "(token lengths are measured on the templated conversation)")
    lengths = []
    for i in range(0, len(conversations), batch):
        texts = tokenizer.apply_chat_template(conversations[i:i + batch], tokenize=False)
        enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
        lengths.extend(len(ids) for ids in enc)
    return lengths


def mix_counts(sizes: list[int], weights: list[float], max_rows: int | None) -> list[int]:
    """Rows to take from each source: weight x size, scaled down to max_rows (largest remainders)."""
    wanted = [w * n for w, n in zip(weights, sizes)]
    total = sum(wanted)
    if max_rows is not None and total > max_rows:
        wanted = [x * max_rows / total for x in wanted]
        target = max_rows
    else:
        target = round(total)
    counts = [math.floor(x) for x in wanted]
    for i in sorted(range(len(wanted)), key=lambda i: wanted[i] - counts[i], reverse=True)[: target - sum(counts)]:
        counts[i] += 1
    return counts


def take(rows: list, count: int, rng: random.Random) -> list:
    """`count` rows: whole copies while count >= len(rows), then a seeded sample without replacement."""
    if not rows:
        return []
    copies, rest = divmod(count, len(rows))
    return rows * copies + rng.sample(rows, rest)


# ----------------------------------------------------------------------------------------------------------
# Report


@dataclass
class SourceReport:
    name: str
    format: str
    rows: int = 0              # rows read
    valid: int = 0             # rows that normalised and validated (for dialogue: windows built)
    validation: int = 0        # of those, held out
    kept: int = 0              # training rows left after the filters
    train: int = 0             # training rows after mixing / max_rows
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class DataReport:
    sources: list[SourceReport] = field(default_factory=list)
    train_rows: int = 0
    validation_rows: int = 0
    length_unit: str = "tokens"
    train_lengths: list[int] = field(default_factory=list, repr=False)
    validation_lengths: list[int] = field(default_factory=list, repr=False)
    config: dict = field(default_factory=dict)

    @property
    def dropped(self) -> dict[str, int]:
        total: Counter = Counter()
        for s in self.sources:
            total.update(s.dropped)
        return {k: total[k] for k in DROP_REASONS if total[k]}

    def length_stats(self, which: str = "train") -> dict[str, float]:
        import numpy as np

        values = self.train_lengths if which == "train" else self.validation_lengths
        if not values:
            return {}
        p = np.percentile(values, [50, 90, 99])
        return {"min": int(min(values)), "median": float(p[0]), "p90": float(p[1]), "p99": float(p[2]),
                "max": int(max(values)), "mean": float(np.mean(values)), "total": int(sum(values))}

    def histogram(self, bins: int = 30) -> dict[str, list]:
        import numpy as np

        values = self.train_lengths + self.validation_lengths
        if not values:
            return {"edges": [], "train": [], "validation": []}
        edges = np.histogram_bin_edges(values, bins=bins)
        return {"edges": [float(e) for e in edges],
                "train": np.histogram(self.train_lengths, edges)[0].tolist(),
                "validation": np.histogram(self.validation_lengths, edges)[0].tolist()}

    def summary(self) -> str:
        stats = self.length_stats()
        lines = [f"data: {len(self.sources)} source(s) -> {self.train_rows} train / {self.validation_rows} "
                 f"validation rows"
                 + (f"; train length in {self.length_unit}: median {stats['median']:.0f}, p99 {stats['p99']:.0f}, "
                    f"max {stats['max']}" if stats else "")]
        for s in self.sources:
            lines.append(f"  {s.name} [{s.format}]: {s.rows} rows read, {s.valid} valid, {s.validation} held out, "
                         f"{s.kept} kept after filters, {s.train} in the training mix")
            if s.dropped:
                lines.append("    dropped: " + ", ".join(f"{k} {v}" for k, v in s.dropped.items()))
        dropped = self.dropped
        lines.append("  dropped in total: " + (", ".join(f"{k} {v}" for k, v in dropped.items()) or "none"))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"train_rows": self.train_rows, "validation_rows": self.validation_rows,
                "dropped": self.dropped, "sources": [asdict(s) for s in self.sources],
                "length_unit": self.length_unit, "train_length_stats": self.length_stats("train"),
                "validation_length_stats": self.length_stats("validation"),
                "length_histogram": self.histogram(), "config": self.config}

    def write(self, out_dir) -> tuple[Path, Path]:
        """data_report.json and data_lengths.png (histogram of train / validation lengths) into out_dir."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report_path, plot_path = out / "data_report.json", out / "data_lengths.png"
        report_path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        hist = self.histogram()
        fig, ax = plt.subplots(figsize=(7, 4))
        if hist["edges"]:
            ax.hist([self.train_lengths, self.validation_lengths], bins=hist["edges"], stacked=True,
                    label=[f"train ({self.train_rows})", f"validation ({self.validation_rows})"])
            ax.legend()
        max_tokens = self.config.get("max_tokens")
        if max_tokens and self.length_unit == "tokens":
            ax.axvline(max_tokens, color="red", linestyle="--", linewidth=1)
        ax.set_xlabel(f"conversation length ({self.length_unit}, chat template applied)"
                      if self.length_unit == "tokens" else f"conversation length ({self.length_unit})")
        ax.set_ylabel("rows")
        ax.set_title("Data: length distribution")
        fig.tight_layout()
        fig.savefig(plot_path, dpi=100)
        plt.close(fig)
        return report_path, plot_path


@dataclass
class PreparedData:
    train: list[dict]
    validation: list[dict]
    report: DataReport


# ----------------------------------------------------------------------------------------------------------
# The pipeline


def check_config(cfg: DataConfig, tokenizer) -> None:
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
    for key in ("max_rows", "max_validation_rows", "min_tokens", "max_tokens"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DataError(f"{key}={value!r}; accepted: an integer >= 1 or null")
    if (cfg.min_tokens or cfg.max_tokens) and tokenizer is None:
        raise DataError("min_tokens/max_tokens need a tokenizer: pass tokenizer= to prepare_data, or set both to null")


def _split(examples: list[dict], fraction: float, rng: random.Random) -> tuple[list[dict], list[dict]]:
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    n_val = min(len(examples) - 1, round(fraction * len(examples)))
    held = set(rng.sample(range(len(examples)), n_val))
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def prepare_data(cfg: DataConfig, tokenizer=None, log: Callable[[str], Any] | None = print) -> PreparedData:
    """Load, normalise, clean, split and mix the sources of `cfg`; rows are {"messages": [...]} dicts."""
    log = log or (lambda _msg: None)
    check_config(cfg, tokenizer)
    report = DataReport(length_unit="tokens" if tokenizer is not None else "characters",
                        config=asdict(cfg))
    drops: list[Counter] = []
    train_parts: list[list[dict]] = []
    validation: list[dict] = []

    for i, src in enumerate(cfg.sources):
        log(f"data: reading {source_name(src)}")
        rows = read_rows(src)
        counter: Counter = Counter()
        fmt, examples = normalise_source(src, rows, counter)
        srep = SourceReport(name=source_name(src), format=fmt, rows=len(rows), valid=len(examples))
        if cfg.validation_path is None:
            examples, held = _split(examples, cfg.validation_fraction, random.Random(f"{cfg.seed}/split/{i}"))
            validation.extend(held)
            srep.validation = len(held)
        if not examples:
            log(f"data: warning: source {srep.name} has no usable rows ({dict(counter) or 'it is empty'})")
        report.sources.append(srep)
        drops.append(counter)
        train_parts.append(examples)

    if cfg.validation_path is not None:
        vsrc = SourceConfig(path=cfg.validation_path)
        vrows = read_rows(vsrc)
        vdrops: Counter = Counter()
        _, validation = normalise_source(vsrc, vrows, vdrops)
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
    if tokenizer is not None:
        for part in train_parts:
            for e, n in zip(part, token_lengths(tokenizer, [e["messages"] for e in part])):
                e["length"] = n
        if cfg.min_tokens is not None:
            apply(lambda ex: [e["length"] >= cfg.min_tokens for e in ex], "too_short")
        if cfg.max_tokens is not None:
            apply(lambda ex: [e["length"] <= cfg.max_tokens for e in ex], "too_long")
    if validation:  # never train on a held-out row, whatever the dedup options say
        seen = {_digest(normalised_text(v["messages"])) for v in validation}
        apply(lambda ex: [_digest(normalised_text(e["messages"])) not in seen for e in ex], "in_validation")

    counts = mix_counts([len(p) for p in train_parts], [s.weight for s in cfg.sources], cfg.max_rows)
    train: list[dict] = []
    for i, (part, count, srep, counter) in enumerate(zip(train_parts, counts, report.sources, drops)):
        srep.kept, srep.train = len(part), count
        srep.dropped = {k: counter[k] for k in DROP_REASONS if counter[k]}
        train.extend(take(part, count, random.Random(f"{cfg.seed}/mix/{i}")))
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
    rows = read_rows(src)
    _, examples = normalise_source(src, rows, Counter())
    return [{"messages": e["messages"]} for e in examples]


def main(argv: list[str] | None = None) -> None:
    """Preview what prepare_data makes of some sources: the summary, and the report files with --out."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("sources", nargs="+", help="local .jsonl/.json/.csv/.parquet files, dataset dirs or Hub ids")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--weights", type=float, nargs="*", help="one mixing weight per source")
    p.add_argument("--assistant-speaker", help="dialogue sources: the speaker played by the assistant")
    p.add_argument("--no-dedup", action="store_true", help="keep exact duplicates")
    p.add_argument("--near-dedup", type=float, help="Jaccard threshold for near-duplicates, e.g. 0.85")
    p.add_argument("--min-score", type=float)
    p.add_argument("--min-tokens", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--validation-fraction", type=float, default=0.05)
    p.add_argument("--max-rows", type=int)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tokenizer", help="HF tokenizer dir or a .gguf file, to measure lengths in tokens")
    p.add_argument("--out", help="directory for data_report.json and data_lengths.png")
    args = p.parse_args(argv)
    weights = args.weights or [1.0] * len(args.sources)
    if len(weights) != len(args.sources):
        p.error(f"--weights has {len(weights)} values for {len(args.sources)} sources; give one per source")
    cfg = DataConfig(sources=[SourceConfig(path=s, format=args.format, weight=w,
                                           assistant_speaker=args.assistant_speaker)
                              for s, w in zip(args.sources, weights)],
                     dedup=not args.no_dedup, near_dedup=args.near_dedup, min_score=args.min_score,
                     min_tokens=args.min_tokens, max_tokens=args.max_tokens,
                     validation_fraction=args.validation_fraction, max_rows=args.max_rows, seed=args.seed)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok_path = Path(args.tokenizer)
        tokenizer = (AutoTokenizer.from_pretrained(tok_path.parent, gguf_file=tok_path.name)
                     if tok_path.suffix == ".gguf" else AutoTokenizer.from_pretrained(args.tokenizer))
    try:
        result = prepare_data(cfg, tokenizer=tokenizer)
    except DataError as e:
        sys.exit(f"error: {e}")
    if args.out:
        for path in result.report.write(args.out):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
