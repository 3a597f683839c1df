"""Compare models on held-out data and on the Space's CPU: quality, answers, speed and memory, in one table.

    python training/evaluate.py --model base=embedded --model tuned=runs/smollm2-cpu \
        --data training/configs/smollm2-135m-cpu.yaml --out runs/eval

A model (NAME=SPEC) is `embedded` (the Space's SmolLM2 GGUF), a fine-tuning run dir (OUT/merged for the loss,
OUT/gguf/*.gguf for serving), an HF model dir or Hub id, or a .gguf file. For each it reports:

* held-out loss and perplexity on assistant tokens only, masked by training.chat_format exactly as in training:
  perplexity = exp(total NLL of the masked tokens / number of masked tokens), pooled over all held-out rows;
* generation checks on a fixed prompt set (training/samples/eval_prompts.jsonl): share of answers that stop by
  themselves, mean length, distinct-1/2 (repetition), and optionally a pairwise judge (off by default);
* CPU serving cost through the Space's own backends (chatbot.backends): time to first token, decode tokens/s and
  peak RSS, each GGUF (and the transformers backend with --transformers-speed) in a fresh process.

--data takes a data file, a recipe YAML or a run dir (then the recipe's own seeded validation split is used, the
same rows finetune.py evaluated on). Writes OUT/results.md, OUT/results.json, OUT/quality_vs_speed.png and the
held-out rows used (OUT/heldout.jsonl).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = REPO_ROOT / "training" / "samples" / "eval_prompts.jsonl"
CARD_BEGIN, CARD_END = "<!-- evaluate.py results begin -->", "<!-- evaluate.py results end -->"


class EvalError(ValueError):
    """Bad input, with one line naming the option, the value and what is accepted."""


def log(msg: str) -> None:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- model specs

@dataclass
class ModelSpec:
    name: str
    source: str                      # what the user passed
    hf: str | None = None            # HF dir or Hub id: loss (and the transformers backend)
    ggufs: list[Path] = field(default_factory=list)  # served by llama.cpp; loss from the dequantised weights


def quant_label(path: Path) -> str:
    """q4_k_m from model-q4_k_m.gguf or SmolLM2-135M-Instruct.Q4_1.gguf; the stem when no known name is in it."""
    from training.export_gguf import QUANTS

    stem = path.stem.lower()
    for q in sorted(set(QUANTS) | {"q4_1", "q4_0", "q8_0"}, key=len, reverse=True):
        if re.search(rf"(^|[.\-_]){re.escape(q)}($|[.\-_])", stem):
            return q
    return path.stem


def parse_model_arg(arg: str) -> tuple[str, str]:
    name, eq, value = arg.partition("=")
    if not eq or not name.strip() or not value.strip():
        raise EvalError(f"--model {arg!r} is not NAME=SPEC; accepted: e.g. base=embedded, tuned=runs/smollm2-cpu, "
                        "x=path/to/model.gguf, y=path/to/hf_dir")
    return name.strip(), value.strip()


def resolve_model(name: str, value: str) -> ModelSpec:
    """What to load for the loss and what to serve, from one --model NAME=SPEC."""
    spec = ModelSpec(name, value)
    if value == "embedded":
        from chatbot.model_files import embedded_gguf_path

        spec.ggufs = [embedded_gguf_path()]
        return spec
    path = Path(value).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise EvalError(f"--model {name}={value!r} is a file but not a .gguf; accepted: embedded, a run dir, "
                            "an HF model dir or Hub id, or a .gguf file")
        spec.ggufs = [path.resolve()]
        return spec
    if path.is_dir():
        path = path.resolve()
        if (path / "merged" / "config.json").is_file() or (path / "gguf").is_dir():  # a finetune.py run dir
            spec.hf = str(path / "merged") if (path / "merged" / "config.json").is_file() else None
            spec.ggufs = sorted((path / "gguf").glob("*.gguf")) if (path / "gguf").is_dir() else []
        else:
            spec.hf = str(path) if (path / "config.json").is_file() else None
            spec.ggufs = sorted(path.glob("*.gguf"))
        if spec.hf is None and not spec.ggufs:
            raise EvalError(f"--model {name}={value!r} holds no model (no config.json, merged/ or *.gguf); "
                            "accepted: a finetune.py run dir, an HF model dir or a dir of .gguf files")
        return spec
    if re.fullmatch(r"[\w.-]+/[\w.-]+", value):  # a Hub id, loaded by transformers (from the cache when offline)
        spec.hf = value
        return spec
    raise EvalError(f"--model {name}={value!r} does not exist; accepted: embedded, a run dir, an HF model dir or "
                    "Hub id (owner/name), or a .gguf file")


def select_quants(spec: ModelSpec, quants: Sequence[str], work_dir: Path) -> None:
    """Keep the GGUFs named by --quants; for a model with an HF dir, export the ones that are missing."""
    if not quants:
        return
    have = {quant_label(p): p for p in spec.ggufs}
    missing = [q for q in quants if q not in have]
    if missing and spec.hf and Path(spec.hf).is_dir():
        from training.export_gguf import export_gguf

        log(f"{spec.name}: exporting {', '.join(missing)} from {spec.hf}")
        for p in export_gguf(spec.hf, work_dir / f"gguf-{spec.name}", missing, progress=False):
            have[quant_label(p)] = p
    elif missing:
        log(f"{spec.name}: no {', '.join(missing)} GGUF and no HF dir to export one from")
    chosen = [have[q] for q in quants if q in have]
    if chosen or spec.hf:
        spec.ggufs = chosen
    else:  # a GGUF-only model (the embedded base) keeps the file it has: there is nothing else to measure
        log(f"{spec.name}: measuring the GGUF it has: {', '.join(p.name for p in spec.ggufs)}")


# ---------------------------------------------------------------- held-out data

def load_heldout(data: str, max_rows: int | None = None) -> tuple[list[dict], str]:
    """(conversations, description). A recipe or run dir gives its validation split, computed as finetune.py does."""
    path = Path(data).expanduser()
    recipe = None
    if path.is_dir() and (path / "config.yaml").is_file() and not (path / "dataset_dict.json").exists():
        recipe = path / "config.yaml"
    elif path.suffix in (".yaml", ".yml"):
        recipe = path
    if recipe is not None:
        from training.config import load_config
        from training.data import prepare_data
        from training.finetune import _resolve_sources

        cfg = load_config(recipe)
        _resolve_sources(cfg)
        # Only the split matters here; token-length filters act on training rows and would need a tokenizer.
        cfg.data.min_tokens = cfg.data.max_tokens = None
        rows = prepare_data(cfg.data, tokenizer=None, log=None).validation
        what = f"validation split of {recipe}"
        if not rows:
            raise EvalError(f"--data {data!r}: the recipe's data gives no validation rows; accepted: a recipe with "
                            "data.validation_fraction > 0 or data.validation_path, or a data file")
    else:
        from training.data import DataError, load_conversations

        try:
            rows = load_conversations(str(path))
        except DataError as exc:
            raise EvalError(f"--data {data!r}: {exc}") from None
        what = str(path)
        if not rows:
            raise EvalError(f"--data {data!r} has no valid conversation; accepted: a .jsonl/.json/.csv/.parquet file "
                            "of conversations with assistant turns, a recipe YAML or a run dir")
    if max_rows is not None:
        rows = rows[:max_rows]
    return rows, what


def load_prompts(path: str | Path) -> list[list[dict]]:
    """Prompt conversations: {"messages": [...]} rows (a trailing assistant turn is dropped) or {"prompt": "..."}."""
    out, bad = [], 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            messages = row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}]
            if messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            if not messages or messages[-1]["role"] != "user":
                raise ValueError
            out.append(messages)
        except (ValueError, KeyError, TypeError):
            bad += 1
    if bad:
        log(f"--prompts {path}: skipped {bad} malformed rows")
    if not out:
        raise EvalError(f"--prompts {str(path)!r} has no usable prompt; accepted: a .jsonl file of "
                        '{"messages": [...ending with a user turn]} or {"prompt": "..."} rows')
    return out


# ---------------------------------------------------------------- held-out loss

def load_for_loss(source: str | Path, chat_template: str | None = None):
    """(model, tokenizer) in fp32 on CPU; a .gguf is dequantised by transformers. The tokenizer is prepared as
    finetune.py prepares it, so the masking matches training token for token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.chat_format import prepare_tokenizer

    source = Path(source) if Path(str(source)).exists() else source
    kwargs: dict[str, Any] = {}
    if isinstance(source, Path) and source.is_file():
        source, kwargs = source.parent, {"gguf_file": source.name}
    tokenizer = AutoTokenizer.from_pretrained(str(source), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32, **kwargs).eval()
    if prepare_tokenizer(tokenizer, chat_template) and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # a pad token only: never a label, never attended to
    return model, tokenizer


def heldout_loss(model, tokenizer, conversations: Sequence[dict], max_length: int = 2048,
                 batch_tokens: int = 4096) -> dict[str, Any]:
    """Loss on the assistant tokens of held-out conversations, masked by training.chat_format.encode_conversation.

    loss = total NLL of every masked (label != -100) next-token prediction / number of such tokens, pooled over
    all rows (long answers weigh more, as in training); perplexity = exp(loss).
    """
    import torch
    import torch.nn.functional as F

    from training.chat_format import IGNORE_INDEX, encode_conversation

    encoded, skipped = [], 0
    for row in conversations:
        try:
            ex = encode_conversation(tokenizer, row["messages"], max_length)
        except Exception:  # a row this template rejects is skipped and counted, as in finetune.py
            ex = None
        if ex is None:
            skipped += 1
        else:
            encoded.append(ex)
    if not encoded:
        raise EvalError("--data: no held-out row has an assistant token after the chat template; accepted: "
                        "conversations that end with an assistant turn")
    encoded.sort(key=lambda e: len(e["input_ids"]))
    total_nll, n_tokens, i = 0.0, 0, 0
    with torch.inference_mode():
        while i < len(encoded):
            # Rows of similar length together, at most batch_tokens padded tokens per forward pass.
            width = len(encoded[i]["input_ids"])
            j = i + 1
            while j < len(encoded) and len(encoded[j]["input_ids"]) * (j + 1 - i) <= batch_tokens:
                j += 1
            batch = encoded[i:j]
            width = max(len(e["input_ids"]) for e in batch)
            pad = lambda seq, v: seq + [v] * (width - len(seq))  # noqa: E731
            ids = torch.tensor([pad(e["input_ids"], 0) for e in batch])
            mask = torch.tensor([pad(e["attention_mask"], 0) for e in batch])
            labels = torch.tensor([pad(e["labels"], IGNORE_INDEX) for e in batch])
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            shifted = labels[:, 1:]
            total_nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                         ignore_index=IGNORE_INDEX, reduction="sum").item()
            n_tokens += int((shifted != IGNORE_INDEX).sum())
            i = j
    loss = total_nll / n_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n_tokens, "rows": len(encoded),
            "skipped_rows": skipped}


# ---------------------------------------------------------------- generation checks

def distinct_n(text: str, n: int) -> float | None:
    """Unique n-grams / all n-grams of one answer's words and punctuation marks (1.0 = no repetition; a loop like
    "Lazy-Lazy-Lazy" counts as the repetition it is); None when the answer is too short."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(words[k:k + n]) for k in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def generation_metrics(answers: Sequence[dict]) -> dict[str, Any]:
    """Stop rate, mean length and mean per-answer distinct-1/2 of answers {"text", "finish_reason", "tokens"}."""
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    return {"answers": len(answers),
            "stop_rate": mean([a["finish_reason"] == "stop" for a in answers]),
            "mean_new_tokens": mean([a["tokens"] for a in answers]),
            "distinct_1": mean([distinct_n(a["text"], 1) for a in answers]),
            "distinct_2": mean([distinct_n(a["text"], 2) for a in answers])}


# ---------------------------------------------------------------- serving cost (one fresh process per model)

def peak_rss_mib() -> float:
    """Peak RSS of this process since its exec (VmHWM). ru_maxrss would not do: Linux carries it over from the
    parent across fork+exec, so a child of a big evaluate.py process would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _serve_worker(job: dict) -> dict:
    """Runs in its own process: load the model with the Space's backend code, answer every prompt, time it."""
    from chatbot.backends import GenerationParams, load_backend
    from chatbot.settings import load_settings

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
        text, tokens, finish, first, last = [], 0, None, None, None
        t0 = time.perf_counter()
        for chunk in backend.stream(messages, params):
            now = time.perf_counter()
            if chunk.text:
                text.append(chunk.text)
                first = first or now
                last = now
            tokens += chunk.tokens
            finish = chunk.finish_reason or finish
        if first is not None:
            ttfts.append(first - t0)
            if tokens > 1 and last > first:  # tokens after the first, over the time they took
                decode_tokens += tokens - 1
                decode_s += last - first
        answers.append({"prompt": messages[-1]["content"], "text": "".join(text), "finish_reason": finish,
                        "tokens": tokens})
    return {"answers": answers, "load_s": load_s,
            "ttft_s": statistics.median(ttfts) if ttfts else None,
            "decode_tps": decode_tokens / decode_s if decode_s else None,
            "peak_rss_mib": peak_rss_mib()}


def measure_serving(backend: str, model: str, prompts: list[list[dict]], *, max_new_tokens: int = 200,
                    temperature: float = 0.2, top_p: float = 0.9, seed: int = 0, threads: int = 2,
                    n_ctx: int = 2048, timeout: float = 1800) -> dict:
    """_serve_worker in a fresh Python process, so peak RSS is this model's alone."""
    job = dict(backend=backend, model=model, prompts=prompts, max_new_tokens=max_new_tokens, threads=threads,
               temperature=temperature, top_p=top_p, seed=seed, n_ctx=n_ctx)
    with tempfile.TemporaryDirectory() as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-m", "training.evaluate", "--serve-worker", str(job_file), str(out_file)],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out_file.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"{backend} serving {model} failed (exit {proc.returncode}): {tail[0]}")
        return json.loads(out_file.read_text())


# ---------------------------------------------------------------- pairwise judge (optional)

JUDGE_SYSTEM = "You are a strict, impartial judge of chatbot answers."
JUDGE_PROMPT = ("Question:\n{question}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\nWhich answer is more helpful, correct "
                "and concise? Reply with one letter only: A, B, or T for a tie.")


def make_judge(url: str | None = None, gguf: str | None = None, judge_model: str | None = None,
               threads: int = 2) -> Callable[[list[dict]], str] | None:
    """messages -> reply text, through the Space's openai or llama_cpp backend; None when no judge is asked."""
    if not url and not gguf:
        return None
    from chatbot.backends import GenerationParams, load_backend
    from chatbot.settings import ConfigError, load_settings

    env = {"CHATBOT_BACKEND": "openai", "CHATBOT_OPENAI_BASE_URL": url} if url else \
        {"CHATBOT_BACKEND": "llama_cpp", "CHATBOT_MODEL": gguf, "CHATBOT_THREADS": str(threads)}
    if judge_model and url:
        env["CHATBOT_MODEL"] = judge_model
    if os.environ.get("OPENAI_API_KEY"):
        env["OPENAI_API_KEY"] = os.environ["OPENAI_API_KEY"]
    try:
        backend = load_backend(load_settings(env))
    except ConfigError as exc:
        raise EvalError(f"{'--judge-url' if url else '--judge-gguf'}: {exc}") from None
    params = GenerationParams(max_new_tokens=8, temperature=0.0, seed=0)
    return lambda messages: "".join(c.text for c in backend.stream(messages, params))


def judge_verdict(judge: Callable[[list[dict]], str], question: str, a: str, b: str) -> str:
    """'A', 'B' or 'T' (a tie, or a reply that names neither)."""
    reply = judge([{"role": "system", "content": JUDGE_SYSTEM},
                   {"role": "user", "content": JUDGE_PROMPT.format(question=question, a=a, b=b)}])
    m = re.search(r"\b([ABT])\b", reply.strip().upper())
    return m.group(1) if m else "T"


def pairwise_win_rate(judge: Callable[[list[dict]], str], reference: Sequence[dict], candidate: Sequence[dict]) -> float:
    """Share of prompts where the candidate's answer beats the reference's (ties count half). Every pair is judged
    in both orders, so a judge that always prefers the first (or second) answer scores 0.5."""
    score = 0.0
    for ref, cand in zip(reference, candidate):
        first = judge_verdict(judge, cand["prompt"], cand["text"], ref["text"])   # candidate is A
        second = judge_verdict(judge, cand["prompt"], ref["text"], cand["text"])  # candidate is B
        score += {"A": 1.0, "B": 0.0}.get(first, 0.5) + {"B": 1.0, "A": 0.0}.get(second, 0.5)
    return score / (2 * len(reference)) if reference else float("nan")


# ---------------------------------------------------------------- the comparison

def evaluate(models: Sequence[tuple[str, str]], data: str, out: str | Path, *, prompts: str | Path = DEFAULT_PROMPTS,
             quants: Sequence[str] = (), quant_loss: bool = True, generation: bool = True,
             transformers_speed: bool = False, judge: Callable[[list[dict]], str] | None = None,
             max_length: int = 2048, max_rows: int | None = None, chat_template: str | None = None,
             max_new_tokens: int = 200, temperature: float = 0.2, top_p: float = 0.9, seed: int = 0,
             threads: int = 2, n_ctx: int = 2048) -> dict:
    """Every model on the same held-out rows and prompts; writes results.{md,json} and quality_vs_speed.png."""
    out = Path(out)
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise EvalError(f"--model names must be unique, got {names}")
    specs = [resolve_model(n, v) for n, v in models]
    rows_data, data_what = load_heldout(data, max_rows)
    prompt_sets = load_prompts(prompts) if generation else []
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_data))
    log(f"held-out: {len(rows_data)} conversations ({data_what}); prompts: {len(prompt_sets)}")

    rows: list[dict] = []
    answers: dict[str, list[dict]] = {}
    for spec in specs:
        select_quants(spec, quants, out)
        variants: list[dict] = []
        if spec.hf:
            variants.append({"variant": "hf", "path": spec.hf, "loss_from": spec.hf,
                             "backend": "transformers" if transformers_speed or not spec.ggufs else None})
        for g in spec.ggufs:
            variants.append({"variant": quant_label(g), "path": str(g), "backend": "llama_cpp",
                             "loss_from": g if (quant_loss or not spec.hf) else None})
        for v in variants:
            row = {"model": spec.name, "variant": v["variant"], "path": v["path"], "backend": v["backend"]}
            if Path(v["path"]).is_file():
                row["size_mib"] = Path(v["path"]).stat().st_size / 2**20
            if v["loss_from"] is not None:
                try:
                    log(f"{spec.name}/{v['variant']}: held-out loss")
                    model, tok = load_for_loss(v["loss_from"], chat_template)
                    row.update(heldout_loss(model, tok, rows_data, max_length))
                    del model
                except EvalError:
                    raise
                except Exception as exc:  # one model that transformers cannot load must not sink the table
                    row["loss_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    log(f"{spec.name}/{v['variant']}: loss failed: {row['loss_error']}")
            if generation and v["backend"]:
                try:
                    log(f"{spec.name}/{v['variant']}: serving with {v['backend']} ({len(prompt_sets)} prompts)")
                    served = measure_serving(v["backend"], v["path"], prompt_sets, max_new_tokens=max_new_tokens,
                                             temperature=temperature, top_p=top_p, seed=seed, threads=threads,
                                             n_ctx=n_ctx)
                    answers[f"{spec.name}/{v['variant']}"] = served.pop("answers")
                    row.update(served)
                    row.update(generation_metrics(answers[f"{spec.name}/{v['variant']}"]))
                except Exception as exc:
                    row["serving_error"] = str(exc)
                    log(f"{spec.name}/{v['variant']}: {exc}")
            rows.append(row)

    judged = None
    if judge is not None and len(specs) > 1:
        firsts = {}
        for r in rows:
            if f"{r['model']}/{r['variant']}" in answers:
                firsts.setdefault(r["model"], r)
        ref = firsts.get(specs[0].name)
        judged = {"reference": specs[0].name, "win_rate": {}}
        if ref is not None:
            for r in firsts.values():
                if r is not ref:
                    log(f"judge: {r['model']} vs {ref['model']}")
                    rate = pairwise_win_rate(judge, answers[f"{ref['model']}/{ref['variant']}"],
                                             answers[f"{r['model']}/{r['variant']}"])
                    r["judge_win_rate"] = judged["win_rate"][r["model"]] = rate

    results = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "data": {"source": data_what, "rows": len(rows_data)},
               "prompts": str(prompts) if generation else None,
               "generation": {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                              "seed": seed, "threads": threads, "n_ctx": n_ctx},
               "models": {s.name: s.source for s in specs}, "rows": rows, "judge": judged, "answers": answers}
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str))
    (out / "results.md").write_text(results_markdown(results) + "\n")
    plot_quality_vs_speed(results, out / "quality_vs_speed.png")
    log(f"wrote {out / 'results.md'}, results.json, quality_vs_speed.png")
    return results


# ---------------------------------------------------------------- outputs

COLUMNS = [("model", "model", "{}"), ("variant", "variant", "{}"), ("loss", "held-out loss", "{:.4f}"),
           ("perplexity", "ppl", "{:.2f}"), ("stop_rate", "stops", "{:.0%}"),
           ("mean_new_tokens", "mean tokens", "{:.0f}"), ("distinct_1", "distinct-1", "{:.2f}"),
           ("distinct_2", "distinct-2", "{:.2f}"), ("ttft_s", "TTFT s", "{:.2f}"),
           ("decode_tps", "decode tok/s", "{:.1f}"), ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
           ("size_mib", "file MiB", "{:.0f}"), ("judge_win_rate", "judge win", "{:.0%}")]


def results_markdown(results: dict) -> str:
    """The comparison as a markdown table (columns with no figure are left out), and how each model compares
    with the first on held-out loss."""
    rows = results["rows"]
    cols = [c for c in COLUMNS if c[0] in ("model", "variant") or any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = [fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    data = results.get("data") or {}
    lines += ["", f"Held-out: {data.get('rows')} conversations ({data.get('source')}); loss = mean NLL per assistant "
              "token (the training mask), ppl = exp(loss). Speed: the Space's backend on "
              f"{(results.get('generation') or {}).get('threads')} CPU thread(s), median time to first token, decode "
              "tok/s = tokens after the first / their time; peak RSS of a fresh process serving that file alone."]
    best = {}
    for r in rows:
        if r.get("loss") is not None:
            best.setdefault(r["model"], r["loss"])
    if len(best) > 1:
        ref_name, ref = next(iter(best.items()))
        for name, loss in list(best.items())[1:]:
            verdict = "lower (better)" if loss < ref else "higher (worse)" if loss > ref else "equal"
            lines.append(f"- {name} vs {ref_name}: held-out loss {loss:.4f} vs {ref:.4f}, "
                         f"{100 * (loss - ref) / ref:+.1f}% - {verdict}")
    return "\n".join(lines)


def plot_quality_vs_speed(results: dict, path: Path) -> Path:
    """Held-out loss (lower is better) against decode tokens/s (higher is better): the best trade-off is
    bottom right. A variant with no loss of its own uses its model's HF loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_loss: dict[str, float] = {}
    for r in results["rows"]:
        if r.get("loss") is not None:
            model_loss.setdefault(r["model"], r["loss"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = [(r, r.get("loss", model_loss.get(r["model"]))) for r in results["rows"]]
    speed = [(r, y) for r, y in points if r.get("decode_tps") and y is not None]
    if speed:
        for r, y in speed:
            ax.scatter(r["decode_tps"], y, s=40)
            ax.annotate(f"{r['model']}/{r['variant']}", (r["decode_tps"], y), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
        unserved = [r for r in results["rows"] if r.get("loss") is not None and not r.get("decode_tps")]
        for r in unserved:  # e.g. the merged HF model: its quality as a reference line for its GGUFs
            ax.axhline(r["loss"], linestyle="--", linewidth=1, color="grey")
            ax.annotate(f"{r['model']}/{r['variant']} (not served)", (0, r["loss"]), xycoords=("axes fraction", "data"),
                        xytext=(4, 3), textcoords="offset points", fontsize=8, color="grey")
        ax.set_xlabel("decode tokens/s (CPU, the Space's backend)")
    else:  # no serving figures: the losses alone
        losses = [(f"{r['model']}/{r['variant']}", y) for r, y in points if y is not None]
        ax.bar([n for n, _ in losses], [y for _, y in losses])
        ax.set_xlabel("model")
    ax.set_ylabel("held-out loss (assistant tokens)")
    ax.set_title("Quality vs CPU speed (better: lower, further right)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def append_to_model_card(card: str | Path, results: dict | str | Path, title: str = "Evaluation") -> Path:
    """Add (or replace) the results table in a model card README.md; `results` is the dict, results.json or its dir.
    Idempotent: a second call replaces the section between the markers instead of adding another."""
    if not isinstance(results, dict):
        p = Path(results)
        results = json.loads((p / "results.json" if p.is_dir() else p).read_text())
    card = Path(card)
    text = card.read_text() if card.is_file() else ""
    section = f"{CARD_BEGIN}\n## {title}\n\n{results_markdown(results)}\n{CARD_END}"
    if CARD_BEGIN in text and CARD_END in text:
        head, rest = text.split(CARD_BEGIN, 1)
        text = head + section + rest.split(CARD_END, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + section + "\n"
    card.write_text(text)
    return card


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", nargs="+", required=True, metavar="NAME=SPEC",
                   help="embedded | run dir | HF dir or Hub id | .gguf file; the first is the reference")
    p.add_argument("--data", required=True, help="held-out data: a data file, a recipe YAML or a run dir")
    p.add_argument("--out", default="runs/eval", help="output dir (default: runs/eval)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="prompt set for the generation checks")
    p.add_argument("--quants", nargs="+", default=[], help="GGUF quantisations to compare (exported from an "
                   "HF/merged dir when missing), e.g. q4_k_m q8_0 q4_0")
    p.add_argument("--no-quant-loss", action="store_true", help="skip the dequantised loss of each GGUF")
    p.add_argument("--no-generation", action="store_true", help="held-out loss only: no prompts, no speed")
    p.add_argument("--transformers-speed", action="store_true",
                   help="also serve HF/merged dirs with the transformers backend")
    p.add_argument("--judge-url", help="OpenAI-compatible /v1 URL of a judge model (pairwise, off by default)")
    p.add_argument("--judge-model", help="model name on the judge server (default: its first)")
    p.add_argument("--judge-gguf", help="a local GGUF judge model, run by llama.cpp")
    p.add_argument("--chat-template", help="for a base with no chat template: chatml, a .jinja file or a tokenizer dir")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per held-out row (longer are cut)")
    p.add_argument("--max-rows", type=int, help="use only the first N held-out rows")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.2, help="default: the Space's 0.2")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for serving (the Space has 2 vCPUs)")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--model-card", help="append the table to this README.md (e.g. RUN_DIR/README.md)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve-worker"]:
        job = json.loads(Path(argv[1]).read_text())
        Path(argv[2]).write_text(json.dumps(_serve_worker(job)))
        return 0
    args = build_parser().parse_args(argv)
    try:
        for opt, value, lo in (("--max-length", args.max_length, 2), ("--max-new-tokens", args.max_new_tokens, 1),
                               ("--threads", args.threads, 1), ("--max-rows", args.max_rows, 1)):
            if value is not None and value < lo:
                raise EvalError(f"{opt}={value} is not valid; accepted: an integer >= {lo}")
        if args.judge_url and args.judge_gguf:
            raise EvalError("--judge-url and --judge-gguf were both given; accepted: one of them")
        models = [parse_model_arg(a) for group in args.model for a in group]
        judge = make_judge(args.judge_url, args.judge_gguf, args.judge_model, args.threads)
        results = evaluate(models, args.data, args.out, prompts=args.prompts, quants=args.quants,
                           quant_loss=not args.no_quant_loss, generation=not args.no_generation,
                           transformers_speed=args.transformers_speed, judge=judge, max_length=args.max_length,
                           max_rows=args.max_rows, chat_template=args.chat_template,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed, threads=args.threads, n_ctx=args.n_ctx)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.model_card:
        append_to_model_card(args.model_card, results)
    print(results_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
