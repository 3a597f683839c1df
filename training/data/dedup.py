"""Exact and near-duplicate removal: normalised-text digests, MinHash signatures with LSH buckets."""
from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any, Iterable


def normalised_text(messages: list[dict]) -> str:
    """The identity of a conversation for dedup: roles and texts, case and whitespace folded."""
    return "\x1e".join(f"{m['role']}\x1f{' '.join(m['content'].lower().split())}" for m in messages)


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def exact_dedup_mask(texts: Iterable[str], seen: set[bytes] | None = None) -> list[bool]:
    """True for the first occurrence of each text (and for none already in `seen`)."""
    seen = set() if seen is None else seen
    keep = []
    for t in texts:
        d = digest(t)
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
