"""The data report: rows per source, drops by reason, length statistics; data_report.json and data_lengths.png."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from training.data.errors import DROP_REASONS


@dataclass
class SourceReport:
    name: str
    format: str
    rows: int = 0              # rows read
    valid: int = 0             # conversations that normalised (for dialogue: windows built) = whole + trimmed
    whole: int = 0             # of those, kept as they were
    trimmed: int = 0           # of those, repaired (turns removed or merged)
    trimmed_by: dict[str, int] = field(default_factory=dict)  # conversations per TRIM_REASONS key
    validation: int = 0        # of the valid ones, held out
    windowed: int = 0          # training conversations longer than max_length, split into windows
    windows_from_long: int = 0  # the training examples those became
    cut_at_max_length: int = 0  # examples still over max_length (one exchange alone is longer): cut when tokenised
    pool: int = 0              # training conversations left after the row filters (score, dedup, held-out copies)
    processed: int | None = None  # max_rows filled the share early: of the pool, the conversations tokenised,
    #                               windowed and length-filtered (the counts of those steps cover these); None: all
    kept: int = 0              # training examples left after the filters
    train: int = 0             # training examples after mixing / max_rows
    salvaged: int | None = None  # records kept from a cut-off JSON file (data.salvage_truncated), else None
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def kept_fraction(self) -> float | None:
        """Share of the rows read that became usable conversations (None for dialogue utterance rows)."""
        if self.format == "dialogue" or not self.rows:
            return None
        return self.valid / self.rows

    def to_dict(self) -> dict:
        return {**asdict(self), "kept_fraction": self.kept_fraction}


@dataclass
class DataReport:
    sources: list[SourceReport] = field(default_factory=list)
    train_rows: int = 0
    validation_rows: int = 0
    length_unit: str = "tokens"
    train_lengths: list[int] = field(default_factory=list, repr=False)
    validation_lengths: list[int] = field(default_factory=list, repr=False)
    config: dict = field(default_factory=dict)
    max_length: int | None = None  # train.max_length the long conversations were windowed for

    @property
    def kept_fraction(self) -> float | None:
        """Share of the conversations read (all sources but dialogue ones) that yield training or held-out rows."""
        counted = [s for s in self.sources if s.kept_fraction is not None]
        rows = sum(s.rows for s in counted)
        return sum(s.valid for s in counted) / rows if rows else None

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
        kept = self.kept_fraction
        lines = [f"data: {len(self.sources)} source(s) -> {self.train_rows} train / {self.validation_rows} "
                 f"validation rows"
                 + (f"; kept {kept:.1%} of the conversations read" if kept is not None else "")
                 + (f"; train length in {self.length_unit}: median {stats['median']:.0f}, p99 {stats['p99']:.0f}, "
                    f"max {stats['max']}" if stats else "")]
        for s in self.sources:
            share = f" ({s.kept_fraction:.1%} kept: {s.whole} whole, {s.trimmed} trimmed)" \
                if s.kept_fraction is not None else ""
            lines.append(f"  {s.name} [{s.format}]: {s.rows} rows read, {s.valid} valid{share}, {s.validation} held "
                         f"out, {s.kept} kept after filters, {s.train} in the training mix")
            if s.processed is not None:
                lines.append(f"    max_rows: its share was filled from {s.processed} of its {s.pool} training "
                             "conversations, taken in a seeded order; the rest were not tokenised")
            if s.salvaged is not None:
                lines.append(f"    salvaged {s.salvaged} complete records from a cut-off file")
            if s.trimmed_by:
                lines.append("    trimmed: " + ", ".join(f"{k} {v}" for k, v in s.trimmed_by.items()))
            if s.windowed or s.cut_at_max_length:
                lines.append(f"    long: {s.windowed} conversations windowed into {s.windows_from_long} examples of "
                             f"<= {self.max_length} tokens; {s.cut_at_max_length} single exchanges over it (cut)")
            if s.dropped:
                lines.append("    dropped: " + ", ".join(f"{k} {v}" for k, v in s.dropped.items()))
        dropped = self.dropped
        lines.append("  dropped in total: " + (", ".join(f"{k} {v}" for k, v in dropped.items()) or "none"))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"train_rows": self.train_rows, "validation_rows": self.validation_rows,
                "kept_fraction": self.kept_fraction, "max_length": self.max_length,
                "dropped": self.dropped, "sources": [s.to_dict() for s in self.sources],
                "length_unit": self.length_unit, "train_length_stats": self.length_stats("train"),
                "validation_length_stats": self.length_stats("validation"),
                "length_histogram": self.histogram(), "config": self.config}

    def write(self, out_dir) -> tuple[Path, Path]:
        """data_report.json and data_lengths.png (histogram of train / validation lengths) into out_dir."""
        from training.plotting import headless_pyplot

        plt = headless_pyplot()
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
