"""Seeded held-out split and weighted mixing of sources."""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CHUNK = 256  # conversations processed at a time while a source's share is being filled


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


@dataclass
class MixedSource:
    rows: list        # the rows this source gives the mix
    processed: int    # its items that went through `process`
    kept: int         # the rows `process` made of them


def mix_processed(parts: list[list], weights: list[float], max_rows: int | None,
                  process: Callable[[int, list], list[list]], seed: Any) -> list[MixedSource]:
    """Each source's share of the mix, where `process(source index, items)` is the costly part (token lengths,
    windows, token filters) and returns, per item, the rows it became (several, or none).

    Without max_rows, or when the mix stays under it, every item is processed and the mix is exactly what
    `mix_counts` and `take` make of all the rows. When max_rows cuts the mix, items go through `process` in a
    seeded order, a chunk at a time, only until each source's share is filled: the shares are `mix_counts` over
    the sizes the sources would have after `process`, extrapolated from the items processed so far (exact once a
    source is done, so a small sample of very uneven items can move a share by a few percent). A source whose share
    is all of it, or more (weight > 1), is processed to the end and sampled by `take` over its rows in their
    original order; one that stops early gives its first rows in the seeded order: a uniform sample of its items
    (a long conversation's windows stay together).
    """
    n = len(parts)
    orders = [random.Random(f"{seed}/order/{i}").sample(range(len(p)), len(p)) for i, p in enumerate(parts)]
    made: list[list[tuple[int, Any]]] = [[] for _ in parts]  # (item index, row), in processing order
    done = [0] * n

    def size(i: int) -> int:
        if done[i] == len(parts[i]):
            return len(made[i])
        return round(len(parts[i]) * len(made[i]) / done[i]) if done[i] else len(parts[i])

    while True:
        sizes = [size(i) for i in range(n)]
        counts = mix_counts(sizes, weights, max_rows)
        capped = max_rows is not None and sum(w * n for w, n in zip(weights, sizes)) > max_rows
        whole = [not capped or counts[i] >= sizes[i] for i in range(n)]
        short = [i for i in range(n) if done[i] < len(parts[i]) and (whole[i] or len(made[i]) < counts[i])]
        if not short:
            break
        for i in short:
            step = CHUNK if whole[i] else max(32, min(CHUNK, counts[i] - len(made[i])))
            indices = orders[i][done[i]:done[i] + step]
            per_item = process(i, [parts[i][j] for j in indices])
            made[i].extend((j, row) for j, rows in zip(indices, per_item) for row in rows)
            done[i] += len(indices)

    mixed = []
    for i in range(n):
        if done[i] == len(parts[i]):
            rows = [row for _, row in sorted(made[i], key=lambda pair: pair[0])]  # stable: windows keep order
            taken = take(rows, counts[i], random.Random(f"{seed}/mix/{i}"))
        else:
            taken = [row for _, row in made[i][:counts[i]]]
        mixed.append(MixedSource(rows=taken, processed=done[i], kept=len(made[i])))
    return mixed


def split_validation(examples: list[dict], fraction: float, rng: random.Random) -> tuple[list[dict], list[dict]]:
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    n_val = min(len(examples) - 1, round(fraction * len(examples)))
    held = set(rng.sample(range(len(examples)), n_val))
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])
