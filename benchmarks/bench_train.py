"""Training throughput: the exact step finetune.py runs vs a naive HF (Q)LoRA baseline vs Unsloth, in one run.

    python benchmarks/bench_train.py --shape llama-3.2-1b --mode qlora --device cuda --steps 20 --warmup 5
    python benchmarks/bench_train.py --shape tiny-llama --device cpu --steps 2 --warmup 1 --seq-len 256   # CI smoke

A random-weight model of the named shape (training/trainer/shapes.py) is saved once; each variant then runs in its own
process (clean peak-memory figures; Unsloth patches transformers on import):

  project  finetune.py's own step (load_model_for_training + build_trainer): packing, Liger on CUDA, no fp32 upcast
  naive    from_pretrained (+ bnb nf4) + peft.prepare_model_for_kbit_training + gradient checkpointing, padded
  unsloth  FastLanguageModel + its gradient checkpointing, same rows/collator as project (when importable)

Rows are synthetic (log-normal lengths, the first 35% masked as a prompt). tokens/s counts real tokens over --steps
optimizer steps after --warmup. MFU = 6 x matmul params x tokens/s / device peak (attention FLOPs not counted).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repository on sys.path (benchmarks/repo_root.py)
    import repo_root  # noqa: F401

from training.trainer.shapes import SHAPES

VARIANTS = ("project", "naive", "unsloth")
FINETOME_CONVERSATIONS = 100_000
PROMPT_FRACTION = 0.35
# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets); first matching substring of the device name wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.0))
RESULT_PREFIX = "BENCH_RESULT "


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------- synthetic data

def row_lengths(n: int, median: int, max_len: int, seed: int = 0, sigma: float = 0.8) -> list[int]:
    """FineTome-like conversation lengths: log-normal around `median` tokens, clipped to [32, max_len]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(math.log(median), sigma, n)).round().astype(int)
    return np.clip(lengths, min(32, max_len), max_len).tolist()


def synthetic_rows(n: int, vocab: int, pad_id: int | None, median: int, max_len: int, seed: int = 0) -> list[dict]:
    """Tokenised rows like chat_format.encode_conversation's, with random ids that are never the pad id (the
    Trainer counts non-pad tokens as real ones)."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    rows = []
    for length in row_lengths(n, median, max_len, seed):
        ids = rng.integers(0, vocab, length)
        if pad_id is not None:
            ids[ids == pad_id] = (pad_id + 1) % vocab
        ids = ids.tolist()
        prompt = max(1, int(length * PROMPT_FRACTION))
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def mean_row_length(median: int, max_len: int) -> float:
    return sum(row_lengths(200_000, median, max_len, seed=123)) / 200_000


# ---------------------------------------------------------------- one variant (child process)

def bench_config(args, out_dir: str, packing: bool, liger: bool):
    """finetune.py's config with the bench's sizes; everything else stays at the recipe defaults."""
    from training.config import TrainConfig

    cfg = TrainConfig()
    cfg.model.mode = args.mode
    cfg.model.gradient_checkpointing = args.grad_ckpt
    cfg.model.attn_implementation = args.attn
    cfg.train.output_dir = out_dir
    cfg.train.max_length = args.seq_len
    cfg.train.per_device_train_batch_size = args.batch
    cfg.train.gradient_accumulation_steps = 1
    cfg.train.max_steps = args.warmup + args.steps
    cfg.train.warmup_ratio = 0.0
    cfg.train.logging_steps = 10**6
    cfg.train.save_steps = 10**9
    cfg.train.eval_steps = 0
    cfg.train.report_to = "none"
    cfg.train.packing = packing
    cfg.train.use_liger = liger
    return cfg


def _naive_model(ckpt: str, cfg, mode: str):
    """What most QLoRA notebooks do: peft's prepare_model_for_kbit_training (fp32 upcast) + grad ckpt."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from training.trainer.modeling import local_device_map

    kwargs = dict(device_map=local_device_map(),
                  dtype=torch.bfloat16 if mode in ("qlora", "bf16", "lora") else torch.float32)
    if mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(ckpt, **kwargs)
    m.config.use_cache = False
    if mode == "qlora":
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=cfg.model.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.model.gradient_checkpointing:
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    lora = cfg.lora
    return get_peft_model(m, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                        target_modules="all-linear", task_type="CAUSAL_LM"))


def _unsloth_model(ckpt: str, cfg, mode: str):
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=ckpt, max_seq_length=cfg.train.max_length, load_in_4bit=mode == "qlora",
        dtype=torch.bfloat16 if mode in ("qlora", "bf16", "lora") else torch.float32, local_files_only=True)
    return FastLanguageModel.get_peft_model(
        model, r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth" if cfg.model.gradient_checkpointing else False)


def _step_timer(warmup: int, total: int):
    """A TrainerCallback that times optimizer steps warmup+1..total and counts the tokens they saw."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks, self.losses = {}, []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, total):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.marks[state.global_step] = (time.perf_counter(), state.num_input_tokens_seen)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "train_loss" in logs:
                self.losses.append(logs["train_loss"])

    return StepTimer()


def run_variant(variant: str, args, ckpt: str) -> dict:
    if variant == "unsloth":
        import unsloth  # noqa: F401  (must come before transformers: it patches it)
    import torch
    from transformers import AutoTokenizer

    from training.finetune import build_trainer
    from training.trainer.modeling import load_model_for_training, plan_training
    from training.trainer.peak_memory import peak_memory_gib

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    packing = args.packing and variant != "naive"
    with tempfile.TemporaryDirectory(prefix=f"bench-{variant}-") as out:
        cfg = bench_config(args, out, packing=packing, liger=args.liger and variant == "project")
        plan = plan_training(cfg, ckpt)  # as finetune.py plans a run: this recipe, this checkpoint, this machine
        mode = plan.mode
        if variant == "project":
            model = load_model_for_training(ckpt, cfg.model, cfg.lora, plan, tokenizer)
            plan = plan.with_attention(model.config._attn_implementation)
        elif variant == "naive":
            model = _naive_model(ckpt, cfg, mode)
        else:
            model = _unsloth_model(ckpt, cfg, mode)
        vocab = model.get_input_embeddings().weight.shape[0]
        n_rows = math.ceil((args.warmup + args.steps) * args.batch * args.seq_len / args.median_len * 1.5) + 8
        rows = synthetic_rows(n_rows, vocab, tokenizer.pad_token_id, args.median_len, args.seq_len, seed=args.seed)
        timer = _step_timer(args.warmup, args.warmup + args.steps)
        trainer = build_trainer(cfg, plan, model, tokenizer, rows, (), [timer])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        (t0, tok0), (t1, tok1) = timer.marks[args.warmup], timer.marks[args.warmup + args.steps]
        cuda = torch.cuda.is_available()
        peak_gib, mem_kind = peak_memory_gib()
        return {
            "variant": variant, "mode": mode, "packing": packing,
            "fused_loss": "liger" if trainer.args.use_liger_kernel else "no",
            "attention": model.config._attn_implementation if hasattr(model.config, "_attn_implementation")
            else "?",
            "tokens": int(tok1 - tok0), "seconds": t1 - t0, "tokens_per_s": (tok1 - tok0) / (t1 - t0),
            "peak_mem_gib": peak_gib, "mem_kind": mem_kind,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "loss": timer.losses[-1] if timer.losses else float("nan"),
        }


# ---------------------------------------------------------------- parent: checkpoint, children, table

def build_checkpoint(args, out_dir: Path) -> int:
    """Random-weight checkpoint of the shape + a tokenizer (only its pad id and length matter); returns the
    number of matmul parameters (everything but the input-embedding lookup; a tied lm_head counts)."""
    import torch

    from training.chat_format import prepare_tokenizer
    from training.config import ModelConfig
    from training.trainer.modeling import load_tokenizer
    from training.trainer.shapes import build_random_model

    tokenizer = load_tokenizer(ModelConfig(name_or_path=args.tokenizer))
    prepare_tokenizer(tokenizer, "chatml")
    overrides = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id)
    if "vocab_size" not in SHAPES[args.shape] or SHAPES[args.shape]["vocab_size"] < len(tokenizer):
        overrides["vocab_size"] = len(tokenizer)
    model = build_random_model(args.shape, seed=args.seed, **overrides)
    emb = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    matmul_params = sum(p.numel() for p in model.parameters()) - (0 if tied else emb)
    model.to(torch.float32 if args.mode == "fp32" else torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return matmul_params


def peak_tflops(device: str, mode: str, override: float | None) -> float | None:
    if override:
        return override
    if device == "cpu" or mode == "fp32":
        return None
    return next((v for k, v in PEAK_BF16_TFLOPS if k in device), None)


def _child_argv(args, variant: str, ckpt: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--checkpoint", ckpt,
            "--shape", args.shape, "--mode", args.mode, "--device", args.device, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--seq-len", str(args.seq_len), "--batch", str(args.batch),
            "--median-len", str(args.median_len), "--seed", str(args.seed),
            "--packing" if args.packing else "--no-packing", "--liger" if args.liger else "--no-liger",
            "--grad-ckpt" if args.grad_ckpt else "--no-grad-ckpt"]
    return argv + (["--attn", args.attn] if args.attn else [])


def run_child(args, variant: str, ckpt: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(_child_argv(args, variant, ckpt), env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    reason = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "?")
    if args.verbose:
        print(proc.stdout + proc.stderr, file=sys.stderr)
    return {"variant": variant, "error": f"exit status {proc.returncode}: {reason.strip()[:160]}"}


def format_table(results: list[dict], matmul_params: int, mean_len: float, mode: str, peak_override) -> str:
    base = next((r for r in results if r["variant"] == "naive" and "error" not in r), None)
    epoch_tokens = FINETOME_CONVERSATIONS * mean_len
    head = ("| run | mode | packing | fused loss | attention | tokens/s | peak mem GiB | MFU | loss | vs naive "
            "| FineTome-100k epoch |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | {mode} | - | - | - | n/a | n/a | n/a | n/a | n/a | "
                         f"not run: {r['error'].replace('|', '/')} |")
            continue
        peak = peak_tflops(r["device"], r["mode"], peak_override)
        mfu = f"{6 * matmul_params * r['tokens_per_s'] / (peak * 1e12):.1%}" if peak else "n/a"
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "n/a"
        epoch = epoch_tokens / r["tokens_per_s"]
        lines.append(f"| {r['variant']} | {r['mode']} | {'yes' if r['packing'] else 'no'} | {r['fused_loss']} | "
                     f"{r['attention']} | {r['tokens_per_s']:.1f} | {r['peak_mem_gib']:.2f} {r['mem_kind']} | "
                     f"{mfu} | {r['loss']:.3f} | {ratio} | {epoch / 3600:.2f} h |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.2-1b", help=f"one of {', '.join(SHAPES)}")
    p.add_argument("--mode", default=None, help="qlora | bf16 | fp32 (default: qlora on cuda, fp32 on cpu)")
    p.add_argument("--device", default="cuda", help="cuda | cpu")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, autotuning)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per packed row; longest conversation")
    p.add_argument("--batch", type=int, default=2, help="rows per step (packed rows, or conversations unpacked)")
    p.add_argument("--median-len", type=int, default=400, help="median synthetic conversation length, tokens")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--liger", action=argparse.BooleanOptionalAction, default=True,
                   help="fused linear+cross-entropy (CUDA + liger-kernel only; else the standard loss)")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--attn", default=None, help="attention implementation (default: flash_attention_2 when "
                   "flash-attn is installed on CUDA, else sdpa)")
    p.add_argument("--compare", default="naive,unsloth", help="comma list of naive, unsloth; '' for none")
    p.add_argument("--tokenizer", default="embedded", help="tokenizer source (only pad id and length are used)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: a table)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--verbose", action="store_true", help="show the children's output when one fails")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.shape not in SHAPES:
        fail(f"--shape {args.shape!r} is not accepted; use one of {', '.join(SHAPES)}")
    if args.device not in ("cuda", "cpu"):
        fail(f"--device {args.device!r} is not accepted; use cuda or cpu")
    args.mode = args.mode or ("qlora" if args.device == "cuda" else "fp32")
    if args.mode not in ("qlora", "bf16", "fp32"):
        fail(f"--mode {args.mode!r} is not accepted; use qlora, bf16 or fp32")
    if args.device == "cpu" and args.mode == "qlora":
        fail("--mode qlora needs --device cuda (bitsandbytes 4-bit); use --mode fp32 or bf16 on cpu")
    for name in ("steps", "warmup", "seq_len", "batch", "median_len"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    compare = [c.strip() for c in args.compare.split(",") if c.strip()]
    bad = [c for c in compare if c not in VARIANTS[1:]]
    if bad:
        fail(f"--compare {bad[0]!r} is not accepted; use a comma list of naive, unsloth")
    args.variants = ["project"] + compare
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(run_variant(args.worker, args, args.checkpoint)), flush=True)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda: no CUDA device here; use --device cpu")
    started = time.time()
    mean_len = mean_row_length(args.median_len, args.seq_len)
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as ckpt:
        matmul_params = build_checkpoint(args, Path(ckpt))
        results = []
        for variant in args.variants:
            if variant == "unsloth" and importlib.util.find_spec("unsloth") is None:
                results.append({"variant": variant, "error": "unsloth is not installed (pip install unsloth)"})
                continue
            print(f"[bench] running {variant} ...", file=sys.stderr, flush=True)
            results.append(run_child(args, variant, ckpt))
    device = next((r["device"] for r in results if "device" in r), args.device)
    print(f"shape={args.shape} mode={args.mode} device={device} seq_len={args.seq_len} batch={args.batch} "
          f"steps={args.steps} (+{args.warmup} warm-up) LoRA r=16 all-linear, random weights, synthetic rows")
    print(format_table(results, matmul_params, mean_len, args.mode, args.peak_tflops))
    print(f"MFU: 6 x {matmul_params / 1e6:.1f}M matmul params x tokens/s / device peak "
          f"({'n/a on cpu' if device == 'cpu' else 'bf16 dense table or --peak-tflops'}); attention FLOPs not counted")
    print(f"epoch assumption: FineTome-100k = {FINETOME_CONVERSATIONS:,} conversations x {mean_len:.0f} tokens mean "
          f"(log-normal, median {args.median_len}, clipped to {args.seq_len}) = "
          f"{FINETOME_CONVERSATIONS * mean_len / 1e6:.1f}M tokens, at the measured tokens/s")
    print(f"bench wall time {time.time() - started:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_params": matmul_params, "mean_len": mean_len,
                                               "results": results}, indent=2))
    return 0 if all("error" not in r for r in results if r["variant"] != "unsloth") else 1


if __name__ == "__main__":
    raise SystemExit(main())
