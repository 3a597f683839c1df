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
