"""Short fine-tuning runs over a grid of recipe options, ranked by held-out loss on one fixed held-out set.

    python training/sweep.py --config training/configs/smollm2-135m-cpu.yaml \
        --grid lr=1e-4,2e-4 r=8,16 --max-steps 30 --data-subset 200 --out runs/sweep

Each grid point is a real finetune.py run in its own process (what one run patches, e.g. Liger's kernels, cannot
leak into the next or into scoring); this process scores every merged model on the same pinned held-out rows.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.config import ConfigError, TrainConfig, apply_overrides, load_config, save_config
from training.data import DataError
from training.evaluation.heldout import heldout_loss, load_for_loss, recipe_heldout_rows
from training.paths import REPO_ROOT
from training.plotting import headless_pyplot

# Short names people type for the usual sweep knobs; anything else is a finetune.py option name.
ALIASES = {"lr": "train.learning_rate", "epochs": "train.num_train_epochs", "steps": "train.max_steps",
           "batch_size": "train.per_device_train_batch_size", "grad_accum": "train.gradient_accumulation_steps"}


def log(msg: str) -> None:
    print(f"[sweep] {msg}", flush=True)


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """["lr=1e-4,2e-4", "r=8,16"] -> [("train.learning_rate", ["1e-4", "2e-4"]), ("r", ["8", "16"])].
    A value in brackets is one list value: target_modules=[q_proj,v_proj],[all-linear]."""
    grid = []
    for item in items:
        key, eq, values = item.partition("=")
        parts = [v.strip() for v in re.split(r",(?![^\[]*\])", values)] if eq else []
        if not eq or not key.strip() or not parts or "" in parts:
            raise ConfigError(f"--grid {item!r} is not KEY=V1,V2,...; accepted: e.g. lr=1e-4,2e-4 r=8,16 "
                              "data.dedup=false,true")
        grid.append((ALIASES.get(key.strip(), key.strip()), parts))
    keys = [k for k, _ in grid]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--grid names a key twice: {keys}")
    return grid


def grid_points(grid: Sequence[tuple[str, list[str]]]) -> list[dict[str, str]]:
    return [dict(zip([k for k, _ in grid], values)) for values in itertools.product(*[v for _, v in grid])]


def _label(point: dict[str, str]) -> str:
    short = {v: k for k, v in ALIASES.items()}
    return " ".join(f"{short.get(k, k)}={v}" for k, v in point.items()) or "recipe"


def pin_heldout(cfg: TrainConfig, out: Path, max_rows: int | None = None) -> tuple[Path, list[dict]]:
    """The recipe's held-out rows, computed once and written to OUT/heldout.jsonl."""
    rows = recipe_heldout_rows(cfg, max_rows)
    path = out / "heldout.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path, rows


def run_point(config_path: Path, result_path: Path) -> int:
    """One grid point, in the process `python -m training.sweep --run-point CONFIG RESULT` that run_sweep starts:
    finetune.run on the point's saved recipe; its summary (or error) is written to RESULT."""
    from training.finetune import run

    try:
        summary = run(load_config(config_path))
        result = {key: summary.get(key) for key in ("final_eval_loss", "final_train_loss", "steps",
                                                     "tokens_per_second")}
        result["train_rows"] = (summary.get("examples") or {}).get("train")
    except Exception as exc:  # reported by the parent next to the other points
        result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    result_path.write_text(json.dumps(result, default=str))
    return 1 if "error" in result else 0


def train_point_in_subprocess(cfg: TrainConfig) -> dict:
    """run_point in a fresh Python process (output streams through); its result dict."""
    run_dir = Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = save_config(cfg, run_dir / "config.yaml")  # finetune.run writes the same file again
    result_path = run_dir / "point_result.json"
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "training.sweep", "--run-point", str(config_path), str(result_path)],
                          cwd=REPO_ROOT, env=env)
    if result_path.is_file():
        return json.loads(result_path.read_text())
    return {"error": f"the run's process ended with exit status {proc.returncode} and no result"}


def shared_base(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    """Overrides that point every run at one HF copy of a GGUF base (converted once); {} for an HF base."""
    from training.trainer.modeling import load_tokenizer, materialize_gguf_base, resolve_base

    if not resolve_base(cfg.model)[1]:
        return {}
    from training.chat_format import prepare_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    prepare_tokenizer(tokenizer, cfg.model.chat_template)
    base = materialize_gguf_base(cfg.model, out / "base", tokenizer)
    return {"model.name_or_path": str(base), "model.gguf_file": None}


def run_sweep(recipe: str | Path, grid: Sequence[tuple[str, list[str]]], out: str | Path, *,
              max_steps: int | None = None, data_subset: int | None = None, eval_rows: int | None = None,
              fixed: dict[str, Any] | None = None, keep: bool = False, baseline: bool = True) -> dict:
    """Run every grid point, score each on the pinned held-out rows, rank, write table/plot/best recipe."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # this process never trains, so nothing is patched
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = load_config(recipe, fixed)
    common = {"data.validation_path": str(out / "heldout.jsonl"), "export.gguf": False, "export.merge": True,
              "export.merged_dtype": "float32", "hub.push_to_hub": None, "hub.push_checkpoints": False,
              "train.report_to": "none", "train.eval_steps": 0, "train.resume": False, **(fixed or {})}
    if max_steps is not None:
        common["train.max_steps"] = max_steps
    if data_subset is not None:
        common["data.max_rows"] = data_subset
    points = grid_points(grid)
    # Every point's config is built (and so validated) before the first run starts.
    configs = [load_config(recipe, {**common, **p, "train.output_dir": str(out / "runs" / f"{i:02d}")})
               for i, p in enumerate(points)]
    if configs and configs[0].train.max_steps > 0:
        for c in configs:  # one checkpoint at the very end at most
            c.train.save_steps = max(c.train.save_steps, c.train.max_steps)
    heldout_path, heldout = pin_heldout(base_cfg, out, eval_rows)
    base_overrides = shared_base(base_cfg, out)
    for c in configs:
        apply_overrides(c, base_overrides)
    log(f"{len(points)} runs; held-out: {len(heldout)} rows pinned in {heldout_path}")

    # Every run is scored on the same rows cut at the same length - the recipe's train.max_length - even where
    # the grid varies max_length: a loss over other cuts of the rows would not rank the runs.
    length = base_cfg.train.max_length
    results: dict[str, Any] = {"recipe": str(recipe), "grid": [[k, v] for k, v in grid], "heldout": str(heldout_path),
                               "heldout_rows": len(heldout), "max_length": length, "max_steps": max_steps,
                               "data_subset": data_subset, "runs": [], "baseline": None}
    if baseline:
        model, tok = load_for_loss(base_overrides.get("model.name_or_path") or configs[0].model.name_or_path,
                                   base_cfg.model.chat_template, device)
        results["baseline"] = heldout_loss(model, tok, heldout, length)
        del model
        torch.cuda.empty_cache()  # the VRAM goes back to the next point's training process
        log(f"untrained base: held-out loss {results['baseline']['loss']:.4f}")
    for i, (point, cfg) in enumerate(zip(points, configs)):
        entry: dict[str, Any] = {"run": i, "label": _label(point), "overrides": point,
                                 "output_dir": cfg.train.output_dir}
        log(f"run {i + 1}/{len(points)}: {entry['label']}")
        started = time.time()
        trained = train_point_in_subprocess(cfg)
        if "error" not in trained:
            entry.update(trainer_eval_loss=trained["final_eval_loss"], final_train_loss=trained["final_train_loss"],
                         steps=trained["steps"], train_rows=trained["train_rows"],
                         tokens_per_second=trained["tokens_per_second"])
            try:
                model, tok = load_for_loss(Path(cfg.train.output_dir) / "merged", device=device)
                entry.update(heldout_loss(model, tok, heldout, length))
                del model
                torch.cuda.empty_cache()
            except Exception as exc:  # one failing point must not lose the others
                trained["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if "error" in trained:  # e.g. out of memory
            entry["error"] = trained["error"]
            log(f"run {i + 1} failed: {entry['error']}")
        entry["wall_s"] = round(time.time() - started, 1)
        if not keep:  # the adapter stays; the big files go
            run_dir = Path(cfg.train.output_dir)
            for d in [run_dir / "merged", *run_dir.glob("checkpoint-*")]:
                shutil.rmtree(d, ignore_errors=True)
        results["runs"].append(entry)
        if "loss" in entry:
            log(f"run {i + 1}: held-out loss {entry['loss']:.4f}")

    ranked = sorted((r for r in results["runs"] if "loss" in r), key=lambda r: r["loss"])
    for rank, r in enumerate(ranked, 1):
        r["rank"] = rank
    results["ranking"] = [r["run"] for r in ranked]
    if ranked:
        best = load_config(recipe, {**(fixed or {}), **ranked[0]["overrides"]})
        best.train.output_dir = f"runs/{Path(recipe).stem}-best"
        results["best"] = {"run": ranked[0]["run"], "label": ranked[0]["label"], "loss": ranked[0]["loss"],
                           "recipe": str(save_config(best, out / "best.yaml"))}
    else:
        results["best"] = None
    (out / "sweep.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "sweep.md").write_text(sweep_markdown(results) + "\n")
    plot_sweep(results, out / "sweep.png")
    log(f"wrote {out / 'sweep.md'}, sweep.json, sweep.png" + (", best.yaml" if ranked else ""))
    return results


def sweep_markdown(results: dict) -> str:
    keys = [k for k, _ in results["grid"]]
    short = {v: k for k, v in ALIASES.items()}
    head = ["rank", *[short.get(k, k) for k in keys], "held-out loss", "ppl", "trainer eval loss", "final train loss", "tokens/s", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    f = lambda v, fmt: fmt.format(v) if isinstance(v, (int, float)) else "-"  # noqa: E731
    order = sorted(results["runs"], key=lambda r: r.get("rank", 10**9))
    for r in order:
        lines.append("| " + " | ".join([str(r.get("rank", "failed")), *[r["overrides"][k] for k in keys],
                                        f(r.get("loss"), "{:.4f}"), f(r.get("perplexity"), "{:.2f}"),
                                        f(r.get("trainer_eval_loss"), "{:.4f}"), f(r.get("final_train_loss"), "{:.4f}"),
                                        f(r.get("tokens_per_second"), "{:.0f}"), f(r.get("wall_s"), "{:.0f}")]) + " |")
    if results.get("baseline"):
        lines.append("| base | " + " | ".join(["-"] * len(keys)) + f" | {results['baseline']['loss']:.4f} | "
                     f"{results['baseline']['perplexity']:.2f} | - | - | - | - |")
    length = results.get("max_length")
    cut = f", cut at {length} tokens (the recipe's train.max_length)" if length else ""
    lines += ["", f"Held-out: {results['heldout_rows']} rows, the same for every run ({results['heldout']}){cut}; "
              "loss = mean NLL per assistant token, pooled over the rows; `base` = the untrained base model; trainer "
              "eval loss = finetune.py's figure for the same rows at the run's own train.max_length (the same "
              "figure unless the grid varies max_length)."]
    if results.get("best"):
        lines.append(f"Best: {results['best']['label']} -> {results['best']['recipe']}")
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"- run {r['run']} ({r['label']}) failed: {r['error']}")
    return "\n".join(lines)


def plot_sweep(results: dict, path: Path) -> Path:
    plt = headless_pyplot()
    done = sorted((r for r in results["runs"] if "loss" in r), key=lambda r: r["loss"], reverse=True)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(done) + 1.8))
    ax.barh([r["label"] for r in done], [r["loss"] for r in done], color="tab:blue")
    if results.get("baseline"):
        ax.axvline(results["baseline"]["loss"], color="tab:red", linestyle="--", label="untrained base")
        ax.legend(loc="lower right")
    ax.set_xlabel("held-out loss (assistant tokens; lower is better)")
    ax.set_title("Sweep: " + Path(results["recipe"]).name)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--run-point"]:
        return run_point(Path(argv[1]), Path(argv[2]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the recipe YAML every run starts from")
    p.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="option values to cross (lr, r, alpha, train.*, lora.*, data.* ...)")
    p.add_argument("--max-steps", type=int, help="steps per run (default: the recipe's)")
    p.add_argument("--data-subset", type=int, help="training rows per run (data.max_rows)")
    p.add_argument("--eval-rows", type=int, help="use only the first N held-out rows")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="fixed overrides for every run")
    p.add_argument("--keep", action="store_true", help="keep each run's merged model and checkpoints")
    p.add_argument("--out", default="runs/sweep")
    args = p.parse_args(argv)
    try:
        for opt, value in (("--max-steps", args.max_steps), ("--data-subset", args.data_subset),
                           ("--eval-rows", args.eval_rows)):
            if value is not None and value < 1:
                raise ConfigError(f"{opt}={value} is not valid; accepted: an integer >= 1")
        fixed = {}
        for item in args.set:
            key, eq, value = item.partition("=")
            if not eq:
                raise ConfigError(f"--set {item!r} is not KEY=VALUE")
            fixed[ALIASES.get(key, key)] = value
        results = run_sweep(args.config, parse_grid(args.grid), args.out, max_steps=args.max_steps,
                            data_subset=args.data_subset, eval_rows=args.eval_rows, fixed=fixed, keep=args.keep)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(sweep_markdown(results))
    return 0 if results.get("best") else 1


if __name__ == "__main__":
    raise SystemExit(main())
