"""The Arena's votes on the training side: the record format (training/data/arena_record.py), votes read as
preference data among the Space's other feedback records (pairs, both-bad as undesirable, ties and malformed
records counted), the leaderboard and promotion rule on votes simulated from known strengths, the CLI and model
card, the Hub path through huggingface_hub's real download call, and votes -> DPO pairs -> a DPO run of the CPU
recipe."""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest

from training.data import Drop, SourceConfig, read_rows
from training.data.arena_record import VOTES, parse_battle, vote_record
from training.data.preference import detect_preference_format, dpo_rows, kto_rows, read_judgements
from training.evaluation.arena import (ELO, MIN_VOTES, Votes, fit_bradley_terry, leaderboard, leaderboard_markdown,
                                       read_votes, votes_needed)
from training.paths import REPO_ROOT

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def model(name: str) -> dict:
    return {"name": name, "backend": "llama_cpp", "model": f"USER/{name}", "file": f"{name}-q4_k_m.gguf",
            "adapter": None, "revision": None}


def battle(i: int, a: str, b: str, vote: str, question: str | None = None, replies=None) -> dict:
    messages = [SYSTEM, {"role": "user", "content": question or f"Question {i}?"}]
    texts = replies or (f"{a}'s answer to {i}.", f"{b}'s answer to {i}.")
    return vote_record(f"{i:08x}", f"2026-12-06T14:{i // 60 % 60:02d}:{i % 60:02d}Z", messages,
                       [{"label": "A", "model": model(a), "reply": texts[0], "sampling": {"temperature": 0.2}},
                        {"label": "B", "model": model(b), "reply": texts[1], "sampling": {"temperature": 0.2}}],
                       vote)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def simulate(strengths: dict[str, float], n: int, seed: int, tie_rate: float = 0.2) -> list[dict]:
    """Votes from known Bradley-Terry strengths (Elo points): each battle a random pair in random positions; a tie or
    both_bad with probability tie_rate, else A wins with P = 1 / (1 + 10^((score_B - score_A) / 400))."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(sorted(strengths), 2)
        if rng.random() < tie_rate:
            vote = rng.choice(["tie", "both_bad"])
        else:
            vote = "A" if rng.random() < 1 / (1 + 10 ** ((strengths[b] - strengths[a]) / 400)) else "B"
        rows.append(battle(i, a, b, vote))
    return rows


def votes_of(rows: list[dict], tmp_path: Path) -> Votes:
    return read_votes(str(write_jsonl(tmp_path / "votes" / "feedback-0.jsonl", rows).parent))


# ---------------------------------------------------------------- the record

def test_the_record_round_trips_and_malformed_ones_are_refused_by_reason():
    row = battle(1, "base", "tuned", "B")
    assert row["type"] == "arena" and [r["label"] for r in row["replies"]] == ["A", "B"]
    parsed = parse_battle(json.loads(json.dumps(row)))
    assert parsed.winner.name == "tuned" and parsed.loser.name == "base" and parsed.decided
    assert not parse_battle({**row, "vote": "both_bad"}).decided and VOTES == ("A", "B", "tie", "both_bad")
    swapped = {**row, "replies": row["replies"][::-1]}  # the list order is free; the labels decide
    assert parse_battle(swapped).winner.name == "tuned"
    bad = {"bad_vote": {**row, "vote": "C"},
           "bad_replies": [{**row, "replies": row["replies"][:1]},
                           {**row, "replies": [row["replies"][0], row["replies"][0]]},          # two A's
                           {**row, "replies": [row["replies"][0], {**row["replies"][1], "model": {"name": " "}}]},
                           {**row, "replies": [row["replies"][0], {**row["replies"][1], "reply": None}]}],
           "missing_field": [{**row, "battle_id": None}, {**row, "type": None}]}
    for reason, rows in bad.items():
        for r in rows if isinstance(rows, list) else [rows]:
            with pytest.raises(Drop) as info:
                parse_battle(r)
            assert info.value.reason == reason
    with pytest.raises(ValueError, match="bad_vote"):
        vote_record("x", "t", row["messages"], row["replies"], "A-ish")


# ---------------------------------------------------------------- votes as preference data

def mixed_records() -> list[dict]:
    """One Space file: thumbs records and arena votes side by side, as chatbot/feedback.py and the Arena write them."""
    q = [SYSTEM, {"role": "user", "content": "What is LoRA?"}]
    thumbs = [{"conversation_id": "c", "timestamp": "2026-12-06T13:00:00Z", "messages": q, "reply": "Low-rank "
               "adapters.", "rating": "up", "model": model("base"), "sampling": {}},
              {"conversation_id": "c", "timestamp": "2026-12-06T13:00:01Z", "messages": q, "reply": "No idea.",
               "rating": "down", "model": model("base"), "sampling": {}}]
    votes = [battle(1, "base", "tuned", "B"), battle(2, "tuned", "base", "A"), battle(3, "base", "tuned", "A"),
             battle(4, "base", "tuned", "both_bad"), battle(5, "base", "tuned", "tie"),
             battle(6, "base", "tuned", "B", replies=("Same.", "Same.")),
             battle(2, "tuned", "base", "A")]  # the same battle again (a copied file)
    broken = [{**battle(7, "base", "tuned", "B"), "vote": None}, {**battle(8, "base", "tuned", "B"), "replies": []},
              {**battle(9, "base", "tuned", "B"), "messages": [{"role": "user", "content": ""}]}]
    return thumbs + votes + broken


def test_votes_are_pairs_both_bad_two_undesirable_replies_ties_and_bad_records_counted(tmp_path):
    rows = mixed_records()
    expected_pairs = [("Question 1?", "tuned's answer to 1.", "base's answer to 1."),
                      ("Question 2?", "tuned's answer to 2.", "base's answer to 2."),
                      ("Question 3?", "base's answer to 3.", "tuned's answer to 3.")]
    file = write_jsonl(tmp_path / "file" / "feedback-1.jsonl", rows)
    for path in (file, file.parent):  # one file (JSON Lines), and the Space's folder (read through `datasets`)
        drops = Counter()
        src = SourceConfig(path=str(path), format="auto")
        fmt, pairs, ratings = read_judgements(src, read_rows(src), drops)
        assert fmt == "feedback"
        assert [(p["prompt"][-1]["content"], p["chosen"], p["rejected"]) for p in pairs] == expected_pairs
        assert all(p["prompt"][0] == SYSTEM for p in pairs)
        assert sorted((r["completion"], r["label"]) for r in ratings) == [
            ("Low-rank adapters.", True), ("No idea.", False),                              # the thumbs
            ("base's answer to 4.", False), ("tuned's answer to 4.", False)]                 # both bad
        assert drops == Counter({"tie_vote": 1, "same_reply": 1, "duplicate_battle": 1, "bad_vote": 1,
                                 "bad_replies": 1, "empty_turn": 1})
        kto = kto_rows(pairs, ratings)
        assert sum(not r["label"] for r in kto) == 3 + 1 + 2 and sum(r["label"] for r in kto) == 3 + 1
        # DPO: the three votes are pairs; the thumbs pair up; both-bad replies have no liked reply to pair with
        unpaired = Counter()
        assert len(dpo_rows(pairs, ratings, unpaired)) == 4 and unpaired == Counter({"unpaired": 2})
    assert detect_preference_format([battle(1, "a", "b", "A")]) == "feedback"  # a file of votes only


# ---------------------------------------------------------------- the leaderboard

def test_the_fit_is_the_bradley_terry_maximum_likelihood_with_one_virtual_tie_per_pair():
    import numpy as np

    wins = np.array([[0.0, 7.5, 3.0], [4.5, 0.0, 6.0], [1.0, 2.0, 0.0]])
    met = np.ones((3, 3)) - np.eye(3)
    p = np.exp(fit_bradley_terry(wins, met))
    w = wins + 0.5 * met
    games = w + w.T
    # The likelihood's stationary point: each model's expected points equal its points.
    expected = (games * p[:, None] / (p[:, None] + p[None, :])).sum(1)
    assert np.allclose(expected, w.sum(1), rtol=1e-8) and math.isclose(np.log(p).mean(), 0, abs_tol=1e-12)
    # Two models: the closed form, strength ratio = (points + 1/2) / (points of the other + 1/2).
    two = fit_bradley_terry(np.array([[0.0, 9.0], [3.0, 0.0]]), np.ones((2, 2)) - np.eye(2))
    assert math.isclose(two[0] - two[1], math.log(9.5 / 3.5), rel_tol=1e-9)


def test_the_leaderboard_finds_the_stronger_model_and_asks_for_more_votes_when_there_are_few(tmp_path):
    true_gap = 150.0  # Elo points: the strong model wins 70% of decided votes
    rows = simulate({"strong": 1000 + true_gap, "weak": 1000}, 600, seed=1)
    result = leaderboard(votes_of(rows, tmp_path / "many"), rounds=400, seed=0)
    strong, weak = result["models"]
    assert strong["model"] == "strong" and strong["votes"] == weak["votes"] == 600
    (v,) = result["verdicts"]
    assert v["better"] and v["low"] > 0 and result["promote"] == "strong"
    # Ties pull the observed gap towards 0 (a tie is half a win): the expected gap with 20% ties is known.
    p_win = 0.2 * 0.5 + 0.8 / (1 + 10 ** (-true_gap / 400))
    expected_gap = ELO * math.log(p_win / (1 - p_win))
    assert v["low"] < expected_gap < v["high"] and abs(v["difference"] - expected_gap) < 40
    assert strong["low"] < strong["score"] < strong["high"]
    text = leaderboard_markdown(result)
    assert "**strong is better than weak**" in text and "**Promote strong**: serve it with CHATBOT_MODEL=USER/strong " \
        "CHATBOT_GGUF_FILE=strong-q4_k_m.gguf" in text

    few = leaderboard(votes_of(rows[:12], tmp_path / "few"), rounds=400, seed=0)
    (v,) = few["verdicts"]
    assert not v["better"] and few["promote"] is None and v["votes"] == 12
    assert v["more_votes"] == votes_needed(v["win_rate"], 12) >= MIN_VOTES - 12
    assert f"no difference yet between {v['leader']} and {v['other']}: about {v['more_votes']} more votes needed" \
        in leaderboard_markdown(few)


def test_three_models_rank_by_strength_and_the_leader_is_compared_with_each(tmp_path):
    rows = simulate({"a": 1200, "b": 1000, "c": 800}, 900, seed=2)
    result = leaderboard(votes_of(rows, tmp_path), rounds=300, seed=5)
    assert [m["model"] for m in result["models"]] == ["a", "b", "c"]
    assert [(v["leader"], v["other"], v["better"]) for v in result["verdicts"]] == [("a", "b", True), ("a", "c", True)]
    again = leaderboard(votes_of(rows, tmp_path), rounds=300, seed=5)
    assert again == result  # seeded
    assert leaderboard(votes_of(rows, tmp_path), rounds=300, seed=6)["models"][0]["low"] != result["models"][0]["low"]


def test_an_even_split_never_promotes_and_says_so(tmp_path):
    rows = [battle(i, "x", "y", "A" if i % 2 else "B") for i in range(40)]
    result = leaderboard(votes_of(rows, tmp_path), rounds=300)
    (v,) = result["verdicts"]
    assert v["win_rate"] == 0.5 and v["more_votes"] is None and not v["better"]
    assert "an even split" in leaderboard_markdown(result)


def test_votes_needed_is_the_two_sided_5_percent_80_percent_power_sample_size():
    assert [votes_needed(p, 0) for p in (0.65, 0.6, 0.55)] == [85, 194, 783]  # the docstring's figures
    assert votes_needed(0.35, 0) == 85 and votes_needed(0.65, 50) == 35
    assert votes_needed(0.65, 84) == 9 and votes_needed(0.9, 3) == MIN_VOTES - 3  # a floor: a tenth more, MIN_VOTES


def test_reader_counts_votes_once_and_passes_over_other_records(tmp_path):
    folder = tmp_path / "feedback"
    write_jsonl(folder / "feedback-a.jsonl", mixed_records())
    write_jsonl(folder / "data" / "feedback-b.jsonl", [battle(1, "base", "tuned", "B"), battle(10, "x", "x", "A"),
                                                        "{not json"])
    votes = read_votes(str(folder))
    assert votes.files == 2 and votes.other_records == 2
    # Battle 9's empty question is still a vote for the leaderboard (it needs no prompt), not for training.
    assert sorted(b.battle_id for b in votes.battles) == [f"{i:08x}" for i in (1, 2, 3, 4, 5, 6, 9)]
    assert votes.skipped == Counter({"duplicate_battle": 2, "bad_vote": 1, "bad_replies": 1, "same_model": 1,
                                     "invalid_json": 1})


# ---------------------------------------------------------------- command line, model card, the Hub

def test_evaluate_arena_prints_the_leaderboard_and_writes_the_model_card_section_once(tmp_path, capsys):
    from training.evaluate import main

    folder = write_jsonl(tmp_path / "fb" / "feedback-x.jsonl", simulate({"t": 1150, "b": 1000}, 300, seed=3)).parent
    card = tmp_path / "README.md"
    card.write_text("# my model\n\nSome text.\n")
    assert main(["--arena", str(folder), "--model-card", str(card), "--rounds", "200"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| rank | model | BT score | 95% interval |") and "**t is better than b**" in out
    assert main(["--arena", str(folder), "--model-card", str(card), "--rounds", "200"]) == 0
    text = card.read_text()
    assert text.startswith("# my model\n\nSome text.\n") and text.count("## Arena") == 1 and "**Promote t**" in text

    for bad, message in ((tmp_path / "nothing-here", "is not valid (no such file or folder"),
                         (tmp_path / "empty", "has no arena votes")):
        if bad.name == "empty":
            write_jsonl(bad / "feedback-1.jsonl", mixed_records()[:2])
        assert main(["--arena", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --arena={bad} ") and message in err and "accepted:" in err
        assert len(err.splitlines()) == 1


def test_a_file_the_reader_cannot_read_or_a_model_card_that_cannot_be_written_is_one_line(tmp_path, capsys):
    from training.evaluate import main

    readme = tmp_path / "README.md"
    readme.write_text("# not votes\n")
    assert main(["--arena", str(readme)]) == 2  # was pyarrow's ArrowInvalid: the unknown suffix read as parquet
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: --arena={readme} is not valid (a .md file")
    assert ".jsonl, .json, .csv, .parquet" in err and "accepted:" in err

    folder = write_jsonl(tmp_path / "fb" / "feedback-x.jsonl", simulate({"t": 1150, "b": 1000}, 40, seed=3)).parent
    for card in (tmp_path / "fb", tmp_path / "no-such-folder" / "README.md"):  # IsADirectoryError, FileNotFoundError
        assert main(["--arena", str(folder), "--model-card", str(card), "--rounds", "100"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: --model-card={card} could not be written (")
        assert "accepted: a README.md path in an existing folder" in err
    assert not (tmp_path / "no-such-folder").exists()


def test_a_hub_dataset_is_downloaded_with_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    folder = tmp_path / "snapshot"
    write_jsonl(folder / "data" / "feedback-1.jsonl", simulate({"p": 1100, "q": 1000}, 30, seed=4))
    (folder / "README.md").write_text("not votes")
    calls = []
    signature = inspect.signature(huggingface_hub.snapshot_download)

    def standin(*args, **kwargs):  # bound against the real signature, so a wrong keyword fails here too
        calls.append(signature.bind(*args, **kwargs).arguments)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", standin)
    votes = read_votes("USER/space-feedback")
    assert len(votes.battles) == 30 and votes.files == 1
    assert calls == [{"repo_id": "USER/space-feedback", "repo_type": "dataset", "allow_patterns": ["*.jsonl"]}]


# ---------------------------------------------------------------- the shipped sample

def load_sample_script():
    spec = importlib.util.spec_from_file_location("make_arena_votes", REPO_ROOT / "training/samples/make_arena_votes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_vote_sample_is_reproducible_and_its_leaderboard_promotes_the_stronger_model():
    module = load_sample_script()
    path = REPO_ROOT / "training/samples/arena_votes.jsonl"
    assert [json.loads(line) for line in path.read_text().splitlines()] == module.build()
    result = leaderboard(read_votes(str(path)))
    assert result["votes"] == module.BATTLES and result["promote"] == "kto"
    assert result["skipped"] == {"bad_vote": 1, "bad_replies": 1, "duplicate_battle": 1}
    rates = module.GOOD_ANSWER_RATE  # the story's known answer: kto's expected win rate, ties half
    expected = rates["kto"] * (1 - rates["base"]) + 0.5 * (rates["kto"] * rates["base"]
                                                           + (1 - rates["kto"]) * (1 - rates["base"]))
    assert abs(result["verdicts"][0]["win_rate"] - expected) < 0.05


# ---------------------------------------------------------------- votes -> DPO run of the CPU recipe

def test_votes_train_a_dpo_run_of_the_cpu_recipe(tmp_path, scaled_tiny_llama_dir):
    """The KTO CPU recipe with --train.objective dpo on the vote sample, on the tiny model the other preference tests
    train (the recipe's SmolLM2 itself is trained by test_recipe_cpu.py; the same run on it is in docs/improving.md)."""
    from training.config import load_config
    from training.data.preference import prepare_preference_data
    from training.finetune import run

    votes = REPO_ROOT / "training/samples/arena_votes.jsonl"
    cfg = load_config(REPO_ROOT / "training/configs/smollm2-135m-kto-cpu.yaml", {
        "model.name_or_path": str(scaled_tiny_llama_dir), "data.sources": [str(votes)], "train.objective": "dpo",
        "train.output_dir": str(tmp_path / "run"), "max_steps": 8, "gradient_accumulation_steps": 1,
        "max_length": 128, "warmup_ratio": 0.0, "logging_steps": 1, "eval_steps": 0, "save_steps": 100,
        "data.max_validation_rows": 8, "export.merge": False, "export.gguf": False})
    assert cfg.train.objective == "dpo" and cfg.lora.r == 8  # the recipe's own settings otherwise
    data = prepare_preference_data(cfg.data, "dpo", log=None)
    decided = [b for b in read_votes(str(votes)).battles if b.decided]
    # Every vote for A or B is one pair, trained or held out (whole prompts); both-bad and ties give none.
    full = prepare_preference_data(dataclasses.replace(cfg.data, max_validation_rows=None), "dpo", log=None)
    assert len(full.train) + len(full.validation) == len(decided) and len(data.validation) == 8
    assert {(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in full.train + full.validation} == {
        (b.winner.text, b.loser.text) for b in decided}
    summary = run(cfg)
    losses = [p["loss"] for p in summary["train_loss"]]
    assert summary["steps"] == 8 and len(losses) == 8
    # Step 1 of DPO: the policy is the reference, so the loss is -log sigmoid(0) = ln 2; then it learns the votes.
    assert math.isclose(losses[0], math.log(2), abs_tol=1e-4) and sum(losses[-3:]) / 3 < math.log(2)
    assert summary["final_eval_loss"] < math.log(2)
    assert "| objective | dpo (beta 0.1) |" in (Path(cfg.train.output_dir) / "README.md").read_text()
