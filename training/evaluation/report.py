"""The model comparison's outputs: the results table, the quality-vs-speed plot and the model card section."""
from __future__ import annotations

import json
from pathlib import Path

CARD_BEGIN, CARD_END = "<!-- evaluate.py results begin -->", "<!-- evaluate.py results end -->"

COLUMNS = [("model", "model", "{}"), ("variant", "variant", "{}"), ("loss", "held-out loss", "{:.4f}"),
           ("perplexity", "ppl", "{:.2f}"), ("reward_accuracy", "reward accuracy", "{:.0%}"),
           ("reward_margin", "reward margin", "{:+.2f}"), ("logp_rate", "log-prob rate (no reference)", "{:.0%}"),
           ("logp_margin", "log-prob margin nats", "{:+.1f}"), ("stop_rate", "stops", "{:.0%}"),
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
    cut = f", cut at {data['max_length']} tokens ({data.get('max_length_from')})" if data.get("max_length") else ""
    lines += ["", f"Held-out: {data.get('rows')} conversations ({data.get('source')}){cut}; loss = mean NLL per "
              "assistant token (the training mask), pooled over all rows (finetune.py's eval loss on the same rows), "
              "ppl = exp(loss). Speed: the Space's backend on "
              f"{(results.get('generation') or {}).get('threads')} CPU thread(s), median time to first token, decode "
              "tok/s = tokens after the first / their time; peak RSS of a fresh process serving that file alone."]
    if data.get("preference_pairs"):
        lines.append(
            f"Preference: {data['preference_pairs']} held-out pairs ({data.get('preference_source')}), cut at "
            f"{data.get('preference_max_length')} tokens ({data.get('preference_max_length_from')}); each reply "
            "scored by its log-probability summed over its trained tokens. Reward accuracy / margin (what DPO and "
            "KTO optimise, TRL's rewards/accuracies and rewards/margins): reward = beta x (log p(reply) - its "
            f"log p under the reference {data.get('preference_reference')}), beta {data.get('beta')}; accuracy = "
            "share of pairs whose chosen reply gets the higher reward, margin = mean reward difference; the "
            "reference itself has none. Log-prob rate: share of pairs where log p(chosen) > log p(rejected) (ties "
            "half), with no reference: it favours short replies and what the base already preferred.")
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
    from training.plotting import headless_pyplot

    plt = headless_pyplot()
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


def replace_card_section(card: str | Path, begin: str, end: str, body: str) -> Path:
    """Write `body` between the markers `begin` and `end` into a model card README.md: in place of the section
    those markers hold when the card has them, else at its end (a missing card is created). OSError when the card
    cannot be written (a directory, or a folder that does not exist)."""
    card = Path(card)
    section = f"{begin}\n{body}\n{end}"
    text = card.read_text() if card.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + section + "\n"
    card.write_text(text)
    return card


def append_to_model_card(card: str | Path, results: dict | str | Path, title: str = "Evaluation") -> Path:
    """Add (or replace) the results table in a model card README.md; `results` is the dict, results.json or its dir.
    Idempotent: a second call replaces the section between the markers instead of adding another."""
    if not isinstance(results, dict):
        p = Path(results)
        results = json.loads((p / "results.json" if p.is_dir() else p).read_text())
    return replace_card_section(card, CARD_BEGIN, CARD_END, f"## {title}\n\n{results_markdown(results)}")
