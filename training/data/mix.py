"""Seeded held-out split and weighted mixing of sources."""
from __future__ import annotations

import math
import random


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



def split_validation(examples: list[dict], fraction: float, rng: random.Random) -> tuple[list[dict], list[dict]]:
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    n_val = min(len(examples) - 1, round(fraction * len(examples)))
    held = set(rng.sample(range(len(examples)), n_val))
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])
