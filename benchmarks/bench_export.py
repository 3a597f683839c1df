"""GGUF export: wall time and peak RSS per quant, for SmolLM2-135M and a Llama-3.2-1B-shaped random model.

    python benchmarks/bench_export.py                      # both models, f16 q8_0 q4_k_m
    python benchmarks/bench_export.py --models smollm2     # just the small one
    python benchmarks/bench_export.py --models tiny-llama --quants q8_0 --threads 1   # smoke: the code path only

Each export runs as its own `python training/export_gguf.py` child; its peak RSS is the child's
ru_maxrss from os.wait4 (the whole run: imports, f16 writing, llama.cpp quantisation). The target from
the issue is peak RSS <= 1.5x the model's fp16 size; the "ratio" column is peak RSS / fp16 size.
A q8_0 or q4_k_m row includes writing the intermediate f16 file, as a user asking for one quant pays it.
The `python + imports` row is the fixed cost of the interpreter with torch/transformers/llama_cpp loaded,
which dominates for a 135M model.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repository on sys.path (benchmarks/repo_root.py)
    import repo_root  # noqa: F401

from training.paths import REPO_ROOT

TARGET_RATIO = 1.5


def _smollm2_dir(out: Path) -> Path:
    """SmolLM2-135M-Instruct from the embedded GGUF, as a bf16 safetensors checkpoint (like a merged fine-tune)."""
    import torch
    from transformers import AutoTokenizer

    from chatbot.model_files import embedded_gguf_path
    from training.trainer.modeling import load_gguf_model

    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    load_gguf_model(gguf.parent, gguf.name).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _random_dir(shape: str, out: Path) -> Path:
    """A random-weight model of a named shape, saved as bf16 safetensors, with SmolLM2's tokenizer (padded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatbot.model_files import embedded_gguf_path
    from training.trainer.shapes import SHAPES, shape_config

    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    vocab = {} if SHAPES[shape].get("vocab_size", 0) >= len(tok) else {"vocab_size": len(tok)}  # tiny shapes
    config = shape_config(shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **vocab)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # built in bf16: half the RAM
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _fp16_bytes(model_dir: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                size = 1
                for d in shape:
                    size *= d
                n += size
    return 2 * n


def _run(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        print(err[-2000:], file=sys.stderr)
    return wall, usage.ru_maxrss * 1024, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama-3.2-1b"],
                        help="smollm2 and/or a training/trainer/shapes.py shape name (random weights)")
    parser.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", help="keep the checkpoints and GGUFs here (default: a temp dir)")
    parser.add_argument("--build", nargs=2, metavar=("MODEL", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        name, out = args.build
        (_smollm2_dir if name == "smollm2" else lambda o: _random_dir(name, o))(Path(out))
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-export-"))
    rows = []
    wall, rss, _ = _run([sys.executable, "-c", "import torch, transformers, llama_cpp, gguf"])
    rows.append(("python + imports", "-", wall, rss, None))
    for name in args.models:
        model_dir = work / name
        if not (model_dir / "config.json").is_file():
            # Built in a child: a forked child's ru_maxrss starts at the parent's RSS, so this process must
            # never hold a model itself.
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--build", name, str(model_dir)], check=True)
            print(f"built {name} in {time.perf_counter() - t0:.0f}s -> {model_dir}", file=sys.stderr)
        fp16 = _fp16_bytes(model_dir)
        for quant in args.quants:
            out = work / f"{name}-gguf"
            wall, rss, rc = _run([sys.executable, str(REPO_ROOT / "training" / "export_gguf.py"), "--model", str(model_dir),
                                  "--out", str(out), "--quant", quant, "--threads", str(args.threads)])
            size = (out / f"model-{quant}.gguf").stat().st_size if rc == 0 else 0
            rows.append((name, quant if rc == 0 else f"{quant} FAILED", wall, rss, fp16, size))
            print(f"{name} {quant}: {wall:.1f}s, peak RSS {rss / 2**30:.2f} GiB", file=sys.stderr)

    print(f"\nGGUF export on {os.cpu_count()} cores, threads={args.threads}; target peak RSS <= {TARGET_RATIO}x fp16 size")
    print(f"| {'model':<16} | {'quant':<8} | {'time s':>7} | {'peak RSS GiB':>12} | {'fp16 GiB':>8} | "
          f"{'ratio':>5} | {'file MiB':>8} | {'target':>6} |")
    print("|" + "|".join("-" * (w + 2) for w in (16, 8, 7, 12, 8, 5, 8, 6)) + "|")
    for row in rows:
        name, quant, wall, rss, fp16 = row[:5]
        if fp16 is None:
            print(f"| {name:<16} | {quant:<8} | {wall:>7.1f} | {rss / 2**30:>12.2f} | {'':>8} | {'':>5} | {'':>8} | {'':>6} |")
            continue
        ratio = rss / fp16
        print(f"| {name:<16} | {quant:<8} | {wall:>7.1f} | {rss / 2**30:>12.2f} | {fp16 / 2**30:>8.2f} | "
              f"{ratio:>5.2f} | {row[5] / 2**20:>8.1f} | {'ok' if ratio <= TARGET_RATIO else 'over':>6} |")
    if not args.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if any("FAILED" in row[1] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
