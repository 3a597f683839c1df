"""What serving a model costs on the Space's CPU, measured through the Space's own backends (chatbot.backends):
load time, median time to first token, decode tokens/s and peak RSS, each model in a fresh process."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from training.paths import REPO_ROOT
from training.trainer.peak_memory import peak_rss_bytes


def serve_and_time(job: dict) -> dict:
    """Runs in its own process: load the model with the Space's backend code, answer every prompt, time it."""
    from chatbot.backends import GenerationParams, load_backend
    from chatbot.settings import load_settings
    from chatbot.timing import ReplyClock

    env = {"CHATBOT_BACKEND": job["backend"], "CHATBOT_MODEL": job["model"], "CHATBOT_THREADS": str(job["threads"]),
           "CHATBOT_N_CTX": str(job["n_ctx"]), "CHATBOT_MAX_NEW_TOKENS": str(job["max_new_tokens"])}
    settings = load_settings(env)
    started = time.perf_counter()
    backend = load_backend(settings)
    load_s = time.perf_counter() - started
    params = GenerationParams(max_new_tokens=job["max_new_tokens"], temperature=job["temperature"],
                              top_p=job["top_p"], seed=job["seed"])
    for _ in backend.stream(job["prompts"][0], GenerationParams(max_new_tokens=4, temperature=0.0)):
        pass  # warm-up: first-call allocations are not what a user waits for
    answers, ttfts, decode_tokens, decode_s = [], [], 0, 0.0
    for messages in job["prompts"]:
        text, finish, clock = [], None, ReplyClock()
        for chunk in backend.stream(messages, params):
            clock.add(chunk.text, chunk.tokens)
            text.append(chunk.text)
            finish = chunk.finish_reason or finish
        if clock.ttft is not None:
            ttfts.append(clock.ttft)
            if clock.decode_tps is not None:  # pooled: tokens after the first, over the time they took
                decode_tokens += clock.tokens - clock.tokens_at_first
                decode_s += clock.decode_s
        answers.append({"prompt": messages[-1]["content"], "text": "".join(text), "finish_reason": finish,
                        "tokens": clock.tokens})
    return {"answers": answers, "load_s": load_s,
            "ttft_s": statistics.median(ttfts) if ttfts else None,
            "decode_tps": decode_tokens / decode_s if decode_s else None,
            "peak_rss_mib": peak_rss_bytes() / 2**20}


def measure_serving(backend: str, model: str, prompts: list[list[dict]], *, max_new_tokens: int = 200,
                    temperature: float = 0.2, top_p: float = 0.9, seed: int = 0, threads: int = 2,
                    n_ctx: int = 2048, timeout: float = 1800) -> dict:
    """serve_and_time in a fresh Python process, so peak RSS is this model's alone."""
    job = dict(backend=backend, model=model, prompts=prompts, max_new_tokens=max_new_tokens, threads=threads,
               temperature=temperature, top_p=top_p, seed=seed, n_ctx=n_ctx)
    with tempfile.TemporaryDirectory() as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-m", "training.evaluation.serving_cost", str(job_file), str(out_file)],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out_file.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"{backend} serving {model} failed (exit {proc.returncode}): {tail[0]}")
        return json.loads(out_file.read_text())


if __name__ == "__main__":  # python -m training.evaluation.serving_cost JOB.json RESULT.json (what measure_serving starts)
    Path(sys.argv[2]).write_text(json.dumps(serve_and_time(json.loads(Path(sys.argv[1]).read_text()))))
