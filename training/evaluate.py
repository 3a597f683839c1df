"""Compare models on held-out data and on the Space's CPU: quality, answers, speed and memory, in one table.

    python training/evaluate.py --model base=embedded --model tuned=runs/smollm2-cpu \
        --data training/configs/smollm2-135m-cpu.yaml --out runs/eval

Per model (NAME=SPEC: `embedded`, a finetune.py run dir, an HF dir or Hub id, or a .gguf): held-out loss
(training.evaluation.heldout; rows cut at the recipe's train.max_length, so a run's figure is finetune.py's eval
loss), answers to a prompt set with stop rate and repetition, and serving cost through the Space's own
backends (training.evaluation.serving_cost). Writes OUT/results.md, OUT/results.json, OUT/quality_vs_speed.png, OUT/heldout.jsonl.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.data import DataError
from training.evaluation.report import append_to_model_card, plot_quality_vs_speed, results_markdown
from training.evaluation.heldout import heldout_loss, load_for_loss, recipe_heldout_rows
from training.evaluation.judge import make_judge, pairwise_win_rate
from training.paths import REPO_ROOT, recipe_of, resolve_recipe_paths
from training.evaluation.preference_rate import DEFAULT_BETA, load_heldout_pairs, pair_logps, preference_figures
from training.evaluation.serving_cost import measure_serving

DEFAULT_PROMPTS = REPO_ROOT / "training" / "samples" / "eval_prompts.jsonl"
DEFAULT_MAX_LENGTH = 2048  # tokens per held-out row when neither --max-length nor a recipe says


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
    from training.export.gguf import QUANTS

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
        from training.export.gguf import export_gguf

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

@dataclass
class Recipe:
    path: Path       # the recipe YAML (a run dir's config.yaml)
    config: Any      # its training.config.TrainConfig, data paths resolved against the repository


def load_recipes(**sources: str | None) -> dict[str, Recipe | None]:
    """The recipe each option's value names (a recipe YAML or a run dir; None: neither), each file loaded once.
    Keys are option names with _ for -: load_recipes(data=..., preference_data=...)."""
    from training.config import ConfigError, load_config

    loaded: dict[Path, Recipe] = {}
    out: dict[str, Recipe | None] = {}
    for option, source in sources.items():
        path = recipe_of(source) if source else None
        if path is not None and path not in loaded:
            try:
                cfg = load_config(path)
            except ConfigError as exc:
                raise EvalError(f"--{option.replace('_', '-')} {source!r}: {exc}") from None
            resolve_recipe_paths(cfg)
            loaded[path] = Recipe(path, cfg)
        out[option] = None if path is None else loaded[path]
    return out


def load_heldout(data: str, recipe: Recipe | None, max_rows: int | None = None) -> tuple[list[dict], str]:
    """(conversations, description). A recipe or run dir (`recipe`, loaded by load_recipes) gives the rows
    finetune.py held out for it; a saved dataset dir is read as data even when it holds a config.yaml."""
    path = Path(data).expanduser()
    if (path / "dataset_dict.json").exists():
        recipe = None
    try:
        if recipe is not None:
            rows, what = recipe_heldout_rows(recipe.config, max_rows), f"validation split of {recipe.path}"
        else:
            from training.data import load_conversations

            rows, what = load_conversations(str(path))[:max_rows], str(path)
    except DataError as exc:
        raise EvalError(f"--data {data!r}: {exc}") from None
    if not rows:
        raise EvalError(f"--data {data!r} has no valid conversation; accepted: a .jsonl/.json/.csv/.parquet file "
                        "of conversations with assistant turns, a recipe YAML or a run dir")
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


def scoring_length(asked: int | None, *recipes: Recipe | None) -> tuple[int, str]:
    """(max_length, where it comes from): --max-length, else the first recipe's train.max_length (finetune.py cuts
    its validation rows there, so its eval loss and this held-out loss are one figure), else 2048."""
    if asked is not None:
        return asked, "--max-length"
    for recipe in recipes:
        if recipe is not None:
            return recipe.config.train.max_length, f"train.max_length of {recipe.path}"
    return DEFAULT_MAX_LENGTH, "the default; no recipe named"


# ---------------------------------------------------------------- the comparison

def evaluate(models: Sequence[tuple[str, str]], data: str, out: str | Path, *, prompts: str | Path = DEFAULT_PROMPTS,
             quants: Sequence[str] = (), quant_loss: bool = True, generation: bool = True,
             transformers_speed: bool = False, judge: Callable[[list[dict]], str] | None = None,
             max_length: int | None = None, max_rows: int | None = None, chat_template: str | None = None,
             max_new_tokens: int = 200, temperature: float = 0.2, top_p: float = 0.9, seed: int = 0,
             threads: int = 2, n_ctx: int = 2048, preference_data: str | None = None,
             beta: float | None = None) -> dict:
    """Every model on the same held-out rows and prompts; writes results.{md,json} and quality_vs_speed.png.
    Rows (and pairs) are cut at `max_length`, by default the recipe's train.max_length (scoring_length).
    With preference_data, also each model's preference figures on its held-out pairs
    (training.evaluation.preference_rate): reward accuracy and margin against the first model whose log-probs could
    be computed (the reference: list the base first) with `beta` (default: the dpo/kto recipe's train.beta), and
    the log-prob rate, which needs no reference."""
    out = Path(out)
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise EvalError(f"--model names must be unique, got {names}")
    specs = [resolve_model(n, v) for n, v in models]
    recipes = load_recipes(data=data, preference_data=preference_data)
    rows_data, data_what = load_heldout(data, recipes["data"], max_rows)
    prompt_sets = load_prompts(prompts) if generation else []
    try:
        pairs, pairs_what = (load_heldout_pairs(preference_data, recipes["preference_data"]) if preference_data
                             else ([], None))
    except DataError as exc:
        said = str(exc)
        raise EvalError(said if said.startswith("--preference-data") else f"--preference-data {preference_data!r}: "
                                                                             f"{said}") from None
    (max_length, length_from), (pairs_length, pairs_length_from) = (
        scoring_length(max_length, recipes["data"]), scoring_length(max_length, recipes["preference_data"],
                                                                     recipes["data"]))
    if beta is None:
        beta = DEFAULT_BETA if recipes["preference_data"] is None else recipes["preference_data"].config.train.beta
    reference: dict[str, Any] = {}  # "name", "logps": the first model whose pair log-probs were computed
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_data))
    log(f"held-out: {len(rows_data)} conversations ({data_what}), cut at {max_length} tokens ({length_from}); "
        f"prompts: {len(prompt_sets)}")

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
                    if pairs:
                        logps = pair_logps(model, tok, pairs, pairs_length)
                        reference.setdefault("name", f"{spec.name}/{v['variant']}")
                        is_reference = reference.setdefault("logps", logps) is logps
                        row.update(preference_figures(logps, None if is_reference else reference["logps"], beta))
                        row["preference_reference"] = True if is_reference else None
                    del model
                except DataError as exc:
                    raise EvalError(f"--data: {exc}") from None
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
               "data": {"source": data_what, "rows": len(rows_data), "max_length": max_length,
                        "max_length_from": length_from, "preference_pairs": len(pairs) or None,
                        "preference_source": pairs_what, "preference_max_length": pairs_length if pairs else None,
                        "preference_max_length_from": pairs_length_from if pairs else None,
                        "preference_reference": reference.get("name"), "beta": beta if pairs else None},
               "prompts": str(prompts) if generation else None,
               "generation": {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                              "seed": seed, "threads": threads, "n_ctx": n_ctx},
               "models": {s.name: s.source for s in specs}, "rows": rows, "judge": judged, "answers": answers}
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str))
    (out / "results.md").write_text(results_markdown(results) + "\n")
    plot_quality_vs_speed(results, out / "quality_vs_speed.png")
    log(f"wrote {out / 'results.md'}, results.json, quality_vs_speed.png")
    return results


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", nargs="+", required=True, metavar="NAME=SPEC",
                   help="embedded | run dir | HF dir or Hub id | .gguf file; the first is the reference")
    p.add_argument("--data", required=True, help="held-out data: a data file, a recipe YAML or a run dir")
    p.add_argument("--preference-data", help="held-out preference pairs for the reward accuracy and margin "
                   "(against the first --model: list the base first) and the log-prob rate: a dpo/kto recipe or run "
                   "dir (its held-out prompts) or a preference data file")
    p.add_argument("--beta", type=float, help="beta of the reward margin (default: the --preference-data recipe's "
                   f"train.beta, else {DEFAULT_BETA})")
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
    p.add_argument("--max-length", type=int, help="tokens per held-out row and pair (longer are cut; default: the "
                   f"recipe's train.max_length, as finetune.py cuts them, else {DEFAULT_MAX_LENGTH})")
    p.add_argument("--max-rows", type=int, help="use only the first N held-out rows")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.2, help="default: the Space's 0.2")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for serving (the Space has 2 vCPUs)")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--model-card", help="append the table to this README.md (e.g. RUN_DIR/README.md)")
    p.add_argument("--arena", metavar="DIR_OR_DATASET", help="instead: the Arena leaderboard of the Space's votes "
                   "(a feedback folder or Hub dataset; with --model-card, --rounds, --seed; training.evaluation.arena)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from chatbot.settings import ConfigError as ChatbotConfigError

    if any(a == "--arena" or a.startswith("--arena=") for a in (sys.argv[1:] if argv is None else argv)):
        from training.evaluation.arena import main as arena_main

        return arena_main(argv)
    args = build_parser().parse_args(argv)
    try:
        for opt, value, lo in (("--max-length", args.max_length, 2), ("--max-new-tokens", args.max_new_tokens, 1),
                               ("--threads", args.threads, 1), ("--max-rows", args.max_rows, 1)):
            if value is not None and value < lo:
                raise EvalError(f"{opt}={value} is not valid; accepted: an integer >= {lo}")
        if args.beta is not None and not args.beta > 0:
            raise EvalError(f"--beta={args.beta} is not valid; accepted: a number > 0")
        if args.judge_url and args.judge_gguf:
            raise EvalError("--judge-url and --judge-gguf were both given; accepted: one of them")
        models = [parse_model_arg(a) for group in args.model for a in group]
        try:
            judge = make_judge(args.judge_url, args.judge_gguf, args.judge_model, args.threads)
        except ChatbotConfigError as exc:  # the Space's settings validation, reworded for this tool's options
            raise EvalError(f"{'--judge-url' if args.judge_url else '--judge-gguf'}: {exc}") from None
        results = evaluate(models, args.data, args.out, prompts=args.prompts, quants=args.quants,
                           quant_loss=not args.no_quant_loss, generation=not args.no_generation,
                           transformers_speed=args.transformers_speed, judge=judge, max_length=args.max_length,
                           max_rows=args.max_rows, chat_template=args.chat_template,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed, threads=args.threads, n_ctx=args.n_ctx,
                           preference_data=args.preference_data, beta=args.beta)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.model_card:
        try:
            append_to_model_card(args.model_card, results)
        except OSError as exc:
            print(f"error: --model-card={args.model_card} could not be written ({exc.strerror or exc}); accepted: a "
                  f"README.md path in an existing folder (the results are in {args.out})", file=sys.stderr)
            return 2
    print(results_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
