"""The median of each figure over a benchmark's rounds, for tables that report medians."""
from __future__ import annotations

import statistics


def median_per_figure(rounds: list[dict]) -> dict:
    """Each key's median over the rounds; a list-valued figure element by element (the k-th with the k-th)."""
    first = rounds[0]
    return {key: [statistics.median(r[key][i] for r in rounds) for i in range(len(first[key]))]
            if isinstance(first[key], list) else statistics.median(r[key] for r in rounds) for key in first}
