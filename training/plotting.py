"""matplotlib for writing PNG files on machines without a display (training boxes, CI, Spaces)."""
from __future__ import annotations


def headless_pyplot():
    """matplotlib.pyplot on the Agg backend (files only; no window, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
