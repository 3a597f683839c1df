"""Peak RAM of merging a LoRA adapter into its base: today's in-memory peft merge vs the streamed merge, side by side.

    python benchmarks/bench_merge.py                                  # Llama-3.2-1B and -3B shapes
    python benchmarks/bench_merge.py --shapes llama-3.2-1b            # 1B only (~3 GB of disk, ~6 GB of RAM)

For each shape a random-weight bf16 base checkpoint and a random LoRA adapter (r=16, all linear layers) are written
to disk without ever holding the model in memory; then each merge runs in its own fresh process, so its peak RSS
(VmHWM) is its own. The figure that matters for a free Colab (~12.7 GB of RAM) is peak RSS / the merged model's
16-bit size; the target is <= 1.3x. No network: the tokenizer is the embedded SmolLM2's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repository on sys.path (benchmarks/repo_root.py)
    import repo_root  # noqa: F401

from training.paths import REPO_ROOT

MERGES = {"in-memory (peft, fp32)": "merge_adapter_in_memory", "streamed": "merge_adapter"}
# The in-memory merge holds the fp32 model (4 bytes/parameter) plus peft's and the save's copies: it is skipped, with
# a line saying so, when the machine has less than this much RAM available for it (others may be using the box).
IN_MEMORY_BYTES_PER_PARAM = 6
RESULT_PREFIX = "MERGE_RESULT "


def tokenizer_for_bench():
    from training.chat_format import prepare_tokenizer
    from training.config import ModelConfig
    from training.trainer.modeling import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path="embedded"))
    prepare_tokenizer(tokenizer)
    return tokenizer


def write_base_and_adapter(shape: str, base_dir: Path, adapter_dir: Path, r: int = 16, seed: int = 0) -> int:
    """A bf16 base checkpoint of the shape and a LoRA adapter for it, tensor by tensor; returns the parameter count."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from training.export.merge import ShardWriter
    from training.trainer.shapes import shape_config

    tokenizer = tokenizer_for_bench()
    config = shape_config(shape, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    base_dir.mkdir(parents=True)
    writer = ShardWriter(base_dir, max_bytes=2 << 30)
    params = 0
    for name, p in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        writer.add(name, (torch.randn(p.shape, generator=generator) * 0.02).to(torch.bfloat16))
        params += p.numel()
    writer.close()
    config.dtype = torch.bfloat16
    config.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    adapter = {k: torch.randn(v.shape, generator=generator) * 0.02
               for k, v in get_peft_model_state_dict(peft_model).items()}
    adapter_dir.mkdir(parents=True)
    save_file(adapter, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_model.peft_config["default"].save_pretrained(str(adapter_dir))
    return params


def run_merge(function: str, base_dir: str, adapter_dir: str, out_dir: str) -> dict:
    """In the child: one merge, timed, with this process's peak RSS."""
    import training.export.merge as merge
    from training.trainer.peak_memory import peak_rss_bytes

    tokenizer = tokenizer_for_bench()
    started = time.perf_counter()
    getattr(merge, function)(base_dir, adapter_dir, out_dir, tokenizer, "bfloat16")
    return {"seconds": time.perf_counter() - started, "peak_rss": peak_rss_bytes()}


def available_ram() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def child(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env, capture_output=True,
                          text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"exit status {proc.returncode}: {tail[0][:200]}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="llama-3.2-1b,llama-3.2-3b", help="comma list of training/trainer/shapes.py names")
    p.add_argument("--work-dir", default=None, help="where the checkpoints go (default: a temp dir, deleted)")
    p.add_argument("--build", nargs=3, metavar=("SHAPE", "BASE", "ADAPTER"), help=argparse.SUPPRESS)
    p.add_argument("--merge", nargs=4, metavar=("FUNCTION", "BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build:
        params = write_base_and_adapter(args.build[0], Path(args.build[1]), Path(args.build[2]))
        print(RESULT_PREFIX + json.dumps({"params": params}), flush=True)
        return 0
    if args.merge:
        print(RESULT_PREFIX + json.dumps(run_merge(*args.merge)), flush=True)
        return 0

    from training.trainer.shapes import SHAPES

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        print(f"error: --shapes {bad[0]!r} is not valid; accepted: {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-merge-"))
    rows = []
    try:
        for shape in shapes:
            base, adapter = work / shape / "base", work / shape / "adapter"
            print(f"[bench_merge] {shape}: writing a random base and adapter ...", file=sys.stderr, flush=True)
            built = child(["--build", shape, str(base), str(adapter)])
            if "error" in built:
                rows.append({"shape": shape, "merge": "build", "error": built["error"]})
                continue
            size16 = built["params"] * 2
            for label, function in MERGES.items():
                need = IN_MEMORY_BYTES_PER_PARAM * built["params"]
                if function == "merge_adapter_in_memory" and available_ram() < need:
                    rows.append({"shape": shape, "merge": label, "error": f"skipped: needs ~{need / 2**30:.0f} GiB, "
                                 f"{available_ram() / 2**30:.0f} GiB available"})
                    continue
                out = work / shape / "merged"
                print(f"[bench_merge] {shape}: {label} ...", file=sys.stderr, flush=True)
                result = child(["--merge", function, str(base), str(adapter), str(out)])
                shutil.rmtree(out, ignore_errors=True)
                rows.append({"shape": shape, "merge": label, "size16": size16, **result})
            shutil.rmtree(work / shape, ignore_errors=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    print("| shape | merge | peak RSS GiB | merged 16-bit size GiB | peak / 16-bit size | time s | RSS vs in-memory |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['merge']} | {r['error'].replace('|', '/')} | | | | |")
            continue
        ref = next((x for x in rows if x["shape"] == r["shape"] and x["merge"] == next(iter(MERGES))
                    and "error" not in x), None)
        vs = f"{r['peak_rss'] / ref['peak_rss']:.2f}x" if ref else "n/a"
        print(f"| {r['shape']} | {r['merge']} | {r['peak_rss'] / 2**30:.2f} | {r['size16'] / 2**30:.2f} | "
              f"{r['peak_rss'] / r['size16']:.2f}x | {r['seconds']:.0f} | {vs} |")
    print("peak RSS = VmHWM of a fresh process doing only the merge (imports, tokenizer, reading, merging, "
          "writing bf16 shards); target: streamed <= 1.3x the merged model's 16-bit size")
    return 0 if all("error" not in r or r["error"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
