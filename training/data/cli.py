"""`python -m training.data FILE_OR_ID...`: preview what prepare_data makes of some sources."""
from __future__ import annotations

import sys
from pathlib import Path

from training.data.config import DataConfig, SourceConfig
from training.data.errors import DataError
from training.data.formats import FORMATS
from training.data.pipeline import prepare_data


def _fail(message: str) -> None:
    """A user mistake: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


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
    p.add_argument("--max-length", type=int, help="with --tokenizer: split longer conversations into windows "
                                                  "(finetune.py uses train.max_length)")
    p.add_argument("--strict", action="store_true", help="drop messy conversations whole instead of repairing them")
    p.add_argument("--salvage-truncated", action="store_true",
                   help="keep the complete records of a cut-off .json file instead of stopping")
    p.add_argument("--out", help="directory for data_report.json and data_lengths.png")
    args = p.parse_args(argv)
    weights = args.weights or [1.0] * len(args.sources)
    if len(weights) != len(args.sources):
        p.error(f"--weights has {len(weights)} values for {len(args.sources)} sources; give one per source")
    cfg = DataConfig(sources=[SourceConfig(path=s, format=args.format, weight=w,
                                           assistant_speaker=args.assistant_speaker, repair=not args.strict)
                              for s, w in zip(args.sources, weights)],
                     dedup=not args.no_dedup, near_dedup=args.near_dedup, min_score=args.min_score,
                     min_tokens=args.min_tokens, max_tokens=args.max_tokens,
                     validation_fraction=args.validation_fraction, max_rows=args.max_rows, seed=args.seed,
                     salvage_truncated=args.salvage_truncated)
    if args.max_length is not None and not args.tokenizer:
        _fail(f"--max-length={args.max_length} needs --tokenizer (windows are measured in tokens)")
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok_path = Path(args.tokenizer)
        tokenizer = (AutoTokenizer.from_pretrained(tok_path.parent, gguf_file=tok_path.name)
                     if tok_path.suffix == ".gguf" else AutoTokenizer.from_pretrained(args.tokenizer))
    try:
        result = prepare_data(cfg, tokenizer=tokenizer, max_length=args.max_length)
    except DataError as e:
        _fail(str(e))
    if args.out:
        for path in result.report.write(args.out):
            print(f"wrote {path}")
