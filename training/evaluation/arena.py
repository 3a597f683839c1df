"""The Arena leaderboard: which model do the Space's visitors prefer, and is the difference real yet?

    python training/evaluate.py --arena feedback [--model-card runs/smollm2-135m-kto-cpu/README.md]
    python training/evaluate.py --arena USER/space-feedback      # the Hub dataset the Space pushes to

Reads the arena vote records (training/data/arena_record.py) from a folder of feedback-*.jsonl files (every *.jsonl
below it; the Space's other feedback records in the same files are passed over), one .jsonl file, or a Hub dataset
(downloaded with huggingface_hub.snapshot_download; HF_TOKEN for a private one). Per model:

    win rate   (wins + half the ties) / votes, over all its battles
    BT score   Bradley-Terry strength on the Elo scale Chatbot Arena uses: 1000 + 400 log10(strength), strengths
               normalised to a geometric mean of 1. A gap of d points predicts a win rate of 1 / (1 + 10^(-d/400))
               for the stronger model: 100 points ~ 64%, 200 ~ 76%. Fitted by Hunter's MM iteration
               (p_i <- W_i / sum_j n_ij / (p_i + p_j)), with one virtual tie per pair of models that met, so a
               model that won every vote still gets a finite score (it pulls small samples towards "equal").
    interval   95% percentile bootstrap: the votes resampled with replacement (seeded), the model refitted, the
               2.5th and 97.5th percentiles of its score
    votes      battles it took part in (W / T / L: won, tied or both bad, lost)

A tie counts as half a win for each side, the usual Chatbot Arena treatment. "both_bad" counts as a tie too (as
FastChat's leaderboard does): neither reply was preferred, so it says nothing about which model is better, and
leaving it out would only throw away the information that the two were equally (un)helpful on that prompt. A battle
of a model against itself (the same name on both sides) is skipped.

The promotion rule compares the leader (highest score) with every other model: "LEADER is better than OTHER" when
the bootstrap 95% interval of the score difference excludes 0 and they met in at least MIN_VOTES battles (below
that a percentile bootstrap is too narrow: 5 wins out of 5 resample to 5 out of 5 every time). Otherwise "no
difference yet: about N more votes needed", where N is the usual sample size of a test that a win rate differs
from 50% (one-sample proportion, normal approximation, two-sided alpha = 0.05, power 80%), at the head-to-head win
rate p observed between the two:

    n = ((z_0.975 * sqrt(0.5 * 0.5) + z_0.8 * sqrt(p (1 - p))) / (p - 0.5))^2,     N = n - votes so far

(at least MIN_VOTES in all and a tenth more than so far, since a borderline result needs a few more to settle). At
a 65% win rate n is 85, at 60% 194, at 55% 783. When the leader is better than every other model, the report says
how to serve it (its CHATBOT_* settings, from the records); promoting it is then deploying it as CHATBOT_MODEL.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Sequence

from training.data import DataError, Drop
from training.data.arena_record import Battle, first_seen, is_arena, parse_battle
from training.data.read import LOCAL_SUFFIXES
from training.evaluation.report import replace_card_section

ELO = 400 / math.log(10)       # natural-log strength -> Elo points
BASE_SCORE = 1000
MIN_VOTES = 20
ROUNDS = 1000                  # bootstrap resamples
ALPHA, POWER = 0.05, 0.8
CARD_BEGIN, CARD_END = "<!-- arena leaderboard begin -->", "<!-- arena leaderboard end -->"
SETTINGS = (("backend", "CHATBOT_BACKEND"), ("model", "CHATBOT_MODEL"), ("file", "CHATBOT_GGUF_FILE"),
            ("adapter", "CHATBOT_ADAPTER"), ("revision", "CHATBOT_REVISION"))
ACCEPTED = "a folder of feedback-*.jsonl files, a .jsonl file, or a Hub dataset id (owner/name)"


class ArenaError(ValueError):
    """Bad input, in one line naming what to change."""


# ---------------------------------------------------------------- reading the votes

@dataclass
class Votes:
    source: str
    battles: list[Battle] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)   # reason -> arena records passed over
    other_records: int = 0                             # the Space's thumbs / retry records in the same files
    files: int = 0


def vote_files(source: str) -> list[Path]:
    """The .jsonl files of a local file or folder, or of the Hub dataset `source` (downloaded)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise ArenaError(f"--arena={source} is not valid (a {path.suffix or 'suffix-less'} file; the reader takes "
                             f"{', '.join(LOCAL_SUFFIXES)}); accepted: {ACCEPTED}")
        return [path]
    if path.is_dir():
        return sorted(path.rglob("*.jsonl"))
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if source.count("/") != 1 or source.lower().endswith((".jsonl", ".json")):
            raise HFValidationError(source)
        validate_repo_id(source)
    except HFValidationError:
        raise ArenaError(f"--arena={source} is not valid (no such file or folder, nor a Hub dataset id); "
                         f"accepted: {ACCEPTED}") from None
    try:
        folder = snapshot_download(repo_id=source, repo_type="dataset", allow_patterns=["*.jsonl"])
    except Exception as exc:  # offline, unknown or private repo: say which option and why, in one line
        from chatbot.settings import first_line

        raise ArenaError(f"--arena={source} could not be downloaded from the Hub ({first_line(exc)}); "
                         f"accepted: {ACCEPTED}, with HF_TOKEN set for a private one") from None
    return sorted(Path(folder).rglob("*.jsonl"))


def read_votes(source: str) -> Votes:
    """Every well-formed arena vote of `source`, once per battle id; the rest counted by reason."""
    from training.data.read import read_file

    votes = Votes(source=source)
    seen: set[str] = set()
    for path in vote_files(source):
        votes.files += 1
        try:
            rows, _ = read_file(path, None)
        except DataError as exc:
            raise ArenaError(f"--arena={source}: {exc}") from None
        for row in rows:
            if not isinstance(row, dict):
                votes.skipped["invalid_json"] += 1
                continue
            if not is_arena(row):
                votes.other_records += 1
                continue
            try:
                battle = first_seen(parse_battle(row), seen)
                if battle.replies["A"].name == battle.replies["B"].name:
                    raise Drop("same_model")
            except Drop as d:
                votes.skipped[d.reason] += 1
                continue
            votes.battles.append(battle)
    return votes


# ---------------------------------------------------------------- Bradley-Terry

def fit_bradley_terry(wins, met, iterations: int = 10_000, tol: float = 1e-10):
    """Log-strengths (mean 0 along the last axis) from wins[..., i, j], i's points against j (a tie is half a
    point each way), for one vote set or a batch of them; `met` [i, j]: the pairs that get a virtual tie."""
    import numpy as np

    w = wins + 0.5 * met
    games = w + np.swapaxes(w, -1, -2)
    points = w.sum(-1)
    p = np.ones(points.shape)
    for _ in range(iterations):
        denom = (games / (p[..., :, None] + p[..., None, :])).sum(-1)
        new = np.where(denom > 0, points / np.where(denom > 0, denom, 1.0), 1.0)
        new = np.exp(np.log(new) - np.log(new).mean(-1, keepdims=True))
        converged = np.max(np.abs(np.log(new) - np.log(p))) < tol
        p = new
        if converged:
            break
    return np.log(p)


def votes_needed(win_rate: float, votes: int) -> int | None:
    """About how many more votes until a head-to-head win rate this far from 50% is told apart (module docstring);
    None when it is exactly 50%."""
    if abs(win_rate - 0.5) < 1e-9:
        return None
    z_alpha, z_power = NormalDist().inv_cdf(1 - ALPHA / 2), NormalDist().inv_cdf(POWER)
    n = ((z_alpha * 0.5 + z_power * math.sqrt(win_rate * (1 - win_rate))) / (win_rate - 0.5)) ** 2
    return max(math.ceil(n) - votes, MIN_VOTES - votes, math.ceil(votes / 10), 1)


def serve_settings(model: dict) -> dict[str, str]:
    """The CHATBOT_* variables that serve a model again, from a record's model fields (chatbot.feedback.model_info);
    the embedded default needs none."""
    env = {var: str(model[key]) for key, var in SETTINGS if model.get(key) not in (None, "")}
    if env.get("CHATBOT_BACKEND") == "llama_cpp":
        env.pop("CHATBOT_BACKEND")  # the default
    if env.get("CHATBOT_MODEL") == "embedded":
        env.pop("CHATBOT_MODEL")
        env.pop("CHATBOT_GGUF_FILE", None)
    return env


def leaderboard(votes: Votes, rounds: int = ROUNDS, seed: int = 0) -> dict[str, Any]:
    """Each model's win rate, BT score with its bootstrap 95% interval and votes; the leader's verdict against
    every other model; how to serve the leader when it is better than all of them."""
    import numpy as np

    if not votes.battles:
        raise ArenaError(f"--arena={votes.source} has no arena votes between two models ({votes.files} .jsonl "
                         f"file(s), {votes.other_records} other feedback record(s), {sum(votes.skipped.values())} "
                         f"skipped); accepted: {ACCEPTED} holding the Space's arena records")
    names = sorted({r.name for b in votes.battles for r in b.replies.values()})
    index = {name: i for i, name in enumerate(names)}
    n = len(names)
    latest: dict[str, tuple[str, dict]] = {}
    outcomes: Counter = Counter()  # (i, j, points of i) with i < j -> battles
    for b in votes.battles:
        a, c = b.replies["A"], b.replies["B"]
        for r in (a, c):
            if r.name not in latest or b.timestamp >= latest[r.name][0]:
                latest[r.name] = (b.timestamp, r.model)
        points_a = 1.0 if b.vote == "A" else 0.0 if b.vote == "B" else 0.5
        i, j = index[a.name], index[c.name]
        outcomes[(i, j, points_a) if i < j else (j, i, 1.0 - points_a)] += 1
    keys = list(outcomes)
    counts = np.array([outcomes[k] for k in keys], dtype=float)
    to_wins = np.zeros((len(keys), n * n))  # one battle of each kind -> points in the wins matrix
    for k, (i, j, pts) in enumerate(keys):
        to_wins[k, i * n + j] += pts
        to_wins[k, j * n + i] += 1.0 - pts
    wins = (counts @ to_wins).reshape(n, n)
    met = ((wins + wins.T) > 0).astype(float)
    theta = fit_bradley_terry(wins, met)
    rng = np.random.default_rng(seed)
    resampled = rng.multinomial(int(counts.sum()), counts / counts.sum(), size=rounds).astype(float)
    boot = fit_bradley_terry((resampled @ to_wins).reshape(rounds, n, n), met)
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)

    models = []
    for name, i in index.items():
        games = wins[i] + wins[:, i]
        won = sum(cnt for (a, b, pts), cnt in outcomes.items() if (a == i and pts == 1) or (b == i and pts == 0))
        lost = sum(cnt for (a, b, pts), cnt in outcomes.items() if (a == i and pts == 0) or (b == i and pts == 1))
        total = int(games.sum())
        models.append({"model": name, "score": BASE_SCORE + ELO * theta[i], "low": BASE_SCORE + ELO * lo[i],
                       "high": BASE_SCORE + ELO * hi[i], "votes": total, "wins": won, "ties": total - won - lost,
                       "losses": lost, "win_rate": wins[i].sum() / total if total else None,
                       "serve": serve_settings(latest[name][1])})
    models.sort(key=lambda m: -m["score"])
    leader = models[0]
    li = index[leader["model"]]
    verdicts = []
    for other in models[1:]:
        oi = index[other["model"]]
        played = int(wins[li, oi] + wins[oi, li])
        diff = ELO * (boot[:, li] - boot[:, oi])
        d_lo, d_hi = np.percentile(diff, [2.5, 97.5])
        rate = wins[li, oi] / played if played else None
        better = bool(d_lo > 0 and played >= MIN_VOTES)
        verdicts.append({"leader": leader["model"], "other": other["model"], "votes": played, "win_rate": rate,
                         "difference": ELO * (theta[li] - theta[oi]), "low": float(d_lo), "high": float(d_hi),
                         "better": better, "more_votes": None if better or rate is None else
                         votes_needed(rate, played)})
    totals = Counter(b.vote if b.vote in ("tie", "both_bad") else "decided" for b in votes.battles)
    return {"source": votes.source, "files": votes.files, "votes": len(votes.battles), "decided": totals["decided"],
            "ties": totals["tie"], "both_bad": totals["both_bad"], "skipped": dict(votes.skipped),
            "other_records": votes.other_records, "rounds": rounds, "seed": seed, "models": models,
            "verdicts": verdicts, "promote": leader["model"] if verdicts and all(v["better"] for v in verdicts)
            else None}


# ---------------------------------------------------------------- the report

def verdict_line(v: dict) -> str:
    """The promotion rule's answer for the leader against one other model, with the figures behind it."""
    pair = f"{v['leader']} and {v['other']}"
    facts = (f"score difference {v['difference']:+.0f}, 95% interval {v['low']:+.0f} to {v['high']:+.0f}; "
             + (f"{v['leader']} won {v['win_rate']:.0%} of {v['votes']} head-to-head votes, ties counting half"
                if v["win_rate"] is not None else "they have not met in the arena"))
    if v["better"]:
        return f"**{v['leader']} is better than {v['other']}**: {facts}."
    if v["win_rate"] is None:
        return f"no difference yet between {pair}: {facts}."
    if v["more_votes"] is None:
        return (f"no difference yet between {pair}: {facts}; an even split, no number of votes is expected to "
                f"separate them (a 55% win rate takes about {votes_needed(0.55, 0)} votes to tell from 50%).")
    return f"no difference yet between {pair}: about {v['more_votes']} more votes needed ({facts})."


def leaderboard_markdown(results: dict) -> str:
    lines = ["| rank | model | BT score | 95% interval | win rate | votes | W / T / L |", "|---|---|---|---|---|---|---|"]
    for rank, m in enumerate(results["models"], 1):
        lines.append(f"| {rank} | {m['model']} | {m['score']:.0f} | {m['low']:.0f} to {m['high']:.0f} | "
                     f"{m['win_rate']:.0%} | {m['votes']} | {m['wins']} / {m['ties']} / {m['losses']} |")
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(results["skipped"].items()))
    lines += ["", f"{results['votes']} votes from {results['source']} ({results['decided']} for A or B, "
              f"{results['ties']} ties, {results['both_bad']} both bad; skipped: {skipped or 'none'}). BT score: "
              "Bradley-Terry on the Elo scale (+100 = a 64% expected win rate), ties and both-bad as half a win "
              f"each; interval: {results['rounds']} bootstrap resamples of the votes (seed {results['seed']}). "
              f"A verdict needs the interval of the difference to exclude 0 and at least {MIN_VOTES} votes.", ""]
    lines += [f"- {verdict_line(v)}" for v in results["verdicts"]]
    if results["promote"]:
        m = results["models"][0]
        env = " ".join(f"{k}={v}" for k, v in m["serve"].items()) or "no CHATBOT_MODEL (the embedded default)"
        lines.append(f"- **Promote {m['model']}**: serve it with {env}.")
    return "\n".join(lines)


def write_model_card(card: str | Path, results: dict) -> Path:
    """Add (or replace, between its markers) the leaderboard section of a model card README.md."""
    return replace_card_section(card, CARD_BEGIN, CARD_END, f"## Arena\n\n{leaderboard_markdown(results)}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="evaluate.py --arena", description=__doc__.split("\n\n")[0])
    p.add_argument("--arena", required=True, metavar="DIR_OR_DATASET", help=ACCEPTED)
    p.add_argument("--model-card", help="add the leaderboard to this README.md (e.g. RUN_DIR/README.md)")
    p.add_argument("--rounds", type=int, default=ROUNDS, help=f"bootstrap resamples (default {ROUNDS})")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    args = p.parse_args(argv)
    try:
        if args.rounds < 100:
            raise ArenaError(f"--rounds={args.rounds} is not valid; accepted: an integer >= 100")
        results = leaderboard(read_votes(args.arena), args.rounds, args.seed)
        if args.model_card:
            try:
                write_model_card(args.model_card, results)
            except OSError as exc:
                raise ArenaError(f"--model-card={args.model_card} could not be written ({exc.strerror or exc}); "
                                 "accepted: a README.md path in an existing folder") from None
    except ArenaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(leaderboard_markdown(results))
    return 0
