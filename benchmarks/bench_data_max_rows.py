"""What data.max_rows saves: prepare_data on a big ShareGPT-style file asked for a few hundred rows, against the full
pass over every conversation (what asking for them cost before max_rows filled the mix early), side by side.

    python benchmarks/bench_data_max_rows.py                                   # 17,671 conversations, 600 rows
    python benchmarks/bench_data_max_rows.py --conversations 300 --max-rows 30   # smoke

The corpus is benchmarks/bench_data_keep.py's messy ShareGPT-style one (fixed seed), in one .jsonl file; both runs
use the SmolLM2 tokenizer, max_length 1024, the default data options (dedup, 5% held out) and the same seed, in this
process, the capped run first. "tokenised" counts the training conversations measured in tokens (the costly step:
chat template + tokenizer, and windows for long ones); the held-out rows are measured in both runs and are the
same rows.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repository on sys.path (benchmarks/repo_root.py)
    import repo_root  # noqa: F401

from benchmarks.bench_data_keep import conversation


def timed_prepare(path: Path, tokenizer, max_rows: int | None, max_length: int) -> dict:
    from training.data import DataConfig, SourceConfig, prepare_data

    started = time.perf_counter()
    data = prepare_data(DataConfig(sources=[SourceConfig(str(path))], max_rows=max_rows), tokenizer, log=None,
                        max_length=max_length)
    source = data.report.sources[0]
    return {"seconds": time.perf_counter() - started, "train": len(data.train), "validation": data.validation,
            "tokenised": source.pool if source.processed is None else source.processed, "pool": source.pool}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=17_671)
    p.add_argument("--max-rows", type=int, default=600)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0, help="the corpus's seed")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from chatbot.model_files import embedded_gguf_path

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sharegpt.jsonl"
        path.write_text("".join(json.dumps({"conversations": conversation(rng)}) + "\n"
                                for _ in range(args.conversations)), encoding="utf-8")
        capped = timed_prepare(path, tokenizer, args.max_rows, args.max_length)
        full = timed_prepare(path, tokenizer, None, args.max_length)

    print(f"ShareGPT-style file: {args.conversations:,} conversations ({full['pool']:,} training conversations after "
          f"the split and dedup), max_length {args.max_length}, SmolLM2 tokenizer, {os.cpu_count()} cores")
    print("| run | training rows | conversations tokenised | seconds |")
    print("|---|---|---|---|")
    print(f"| data.max_rows {args.max_rows} | {capped['train']} | {capped['tokenised']:,} | {capped['seconds']:.1f} |")
    print(f"| every conversation (max_rows unset; what max_rows {args.max_rows} cost before) | {full['train']:,} | "
          f"{full['tokenised']:,} | {full['seconds']:.1f} |")
    print(f"max_rows {args.max_rows} / full pass: {capped['seconds'] / full['seconds']:.2f}x the time, "
          f"{capped['tokenised'] / full['tokenised']:.2f}x the conversations tokenised; held-out rows the same: "
          f"{'yes' if capped['validation'] == full['validation'] else 'NO'}")
    return 0 if capped["validation"] == full["validation"] and capped["train"] == min(args.max_rows, full["train"]) \
        else 1


if __name__ == "__main__":
    raise SystemExit(main())
