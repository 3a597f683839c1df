"""Preference tuning: the data formats (pairs, ratings, the Space's feedback records; malformed rows skipped and
counted), and records written by the Space's own feedback code training a KTO run and a DPO run of finetune.py on a
tiny model, whose held-out preference rate beats the base's, merged and exported to GGUF as for SFT."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from training.config import TrainConfig, apply_overrides
from training.data import DataConfig, SourceConfig
from training.data.preference import (detect_preference_format, dpo_rows, heldout_pairs, kto_rows,
                                      prepare_preference_data, read_judgements)

TOPICS = ["apples", "rivers", "clocks", "stars", "bread", "rain", "chess", "trains", "maps", "boats", "lamps", "tea"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def judgements(tmp_path, rows, fmt="auto"):
    drops = Counter()
    src = SourceConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), format=fmt)
    from training.data import read_rows

    fmt, pairs, ratings = read_judgements(src, read_rows(src), drops)
    return fmt, pairs, ratings, drops


# ---------------------------------------------------------------- formats

def test_pairs_with_explicit_and_implicit_prompt_and_bad_rows_counted(tmp_path):
    q = [{"role": "user", "content": "Hi"}]
    rows = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
            {"prompt": q, "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "Meh."},
            {"chosen": q + [{"role": "assistant", "content": "Hey"}], "rejected": q + [{"role": "assistant", "content": "No"}]},
            {"prompt": "Hi", "chosen": "Same", "rejected": "Same"},
            {"prompt": "Hi", "chosen": "x", "rejected": None},
            {"prompt": [{"role": "robot", "content": "Hi"}], "chosen": "a", "rejected": "b"},
            "not json"]
    fmt, pairs, ratings, drops = judgements(tmp_path, rows)
    assert fmt == "pairs" and ratings == []
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [(q, "Hello!", "Go away."), (q, "Hello!", "Meh."),
                                                                          (q, "Hey", "No")]
    assert drops == Counter({"same_reply": 1, "missing_field": 1, "unknown_role": 1, "invalid_json": 1})


def test_ratings_labels_and_kto_dpo_shapes(tmp_path):
    rows = [{"prompt": "Q1", "completion": "good", "label": True}, {"prompt": "Q1", "completion": "bad", "label": "down"},
            {"prompt": "Q1", "completion": "bad2", "label": 0}, {"prompt": "Q2", "completion": "lonely", "label": 1},
            {"prompt": "Q3", "completion": "?", "label": "maybe"}]
    fmt, pairs, ratings, drops = judgements(tmp_path, rows)
    assert fmt == "ratings" and drops == Counter({"bad_label": 1})
    kto = kto_rows(pairs, ratings)
    assert [(r["completion"][0]["content"], r["label"]) for r in kto] == [("good", True), ("bad", False),
                                                                          ("bad2", False), ("lonely", True)]
    assert kto[0]["prompt"] == [{"role": "user", "content": "Q1"}] and kto[0]["completion"][0]["role"] == "assistant"
    unpaired = Counter()
    dpo = dpo_rows(pairs, ratings, unpaired)
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in dpo] == [("good", "bad"), ("good", "bad2")]
    assert unpaired == Counter({"unpaired": 1})  # Q2 has no undesirable reply to pair with


def test_feedback_records_latest_rating_wins_and_null_withdraws(tmp_path):
    m = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    rows = [{"messages": m, "reply": "A", "rating": "up", "timestamp": "2026-01-01T00:00:01Z"},
            {"messages": m, "reply": "A", "rating": "down", "timestamp": "2026-01-01T00:00:02Z"},   # replaces up
            {"messages": m, "reply": "B", "rating": "retried", "timestamp": "2026-01-01T00:00:03Z"},
            {"messages": m, "reply": "C", "rating": "kept", "timestamp": "2026-01-01T00:00:04Z"},
            {"messages": m, "reply": "D", "rating": "up", "timestamp": "2026-01-01T00:00:05Z"},
            {"messages": m, "reply": "D", "rating": None, "timestamp": "2026-01-01T00:00:06Z"},     # withdrawn
            {"messages": m, "reply": "E", "rating": "meh"},
            {"messages": [{"role": "assistant", "content": "x"}], "reply": "F", "rating": "up"}]
    fmt, pairs, ratings, drops = judgements(tmp_path, rows)
    assert fmt == "feedback" and detect_preference_format(rows) == "feedback"
    assert sorted((r["completion"], r["label"]) for r in ratings) == [("A", False), ("B", False), ("C", True)]
    assert drops["bad_label"] == 1 and drops["not_starting_with_user"] == 1 and drops["withdrawn"] == 3
    dpo = dpo_rows(pairs, ratings)
    assert sorted((r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in dpo) == [("C", "A"), ("C", "B")]
    assert dpo[0]["prompt"] == m


def test_prompts_are_held_out_whole(tmp_path):
    rows = []
    for i in range(40):
        m = [{"role": "user", "content": f"question {i}"}]
        rows += [{"messages": m, "reply": f"good {i}", "rating": "up"}, {"messages": m, "reply": f"bad {i}", "rating": "down"}]
    cfg = DataConfig(sources=[SourceConfig(path=str(write_jsonl(tmp_path / "f.jsonl", rows)))], validation_fraction=0.25)
    for objective in ("kto", "dpo"):
        data = prepare_preference_data(cfg, objective, log=None)
        train_prompts = {json.dumps(r["prompt"]) for r in data.train}
        held_prompts = {json.dumps(r["prompt"]) for r in data.validation}
        assert len(held_prompts) == 10 and not train_prompts & held_prompts
        assert len(heldout_pairs(data.validation)) == 10
        assert len(data.train) == (60 if objective == "kto" else 30)


def test_the_shipped_feedback_sample_is_reproducible_and_feeds_the_kto_recipe(tmp_path):
    import importlib.util

    from training.config import load_config
    from training.paths import REPO_ROOT, resolve_recipe_paths

    spec = importlib.util.spec_from_file_location("make_feedback", REPO_ROOT / "training/samples/make_feedback.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = (REPO_ROOT / "training/samples/feedback.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in shipped] == module.build()
    cfg = load_config(REPO_ROOT / "training/configs/smollm2-135m-kto-cpu.yaml")
    resolve_recipe_paths(cfg)
    assert cfg.train.objective == "kto"
    data = prepare_preference_data(cfg.data, "kto", log=None)
    (source,) = data.report.sources
    assert source.format == "feedback" and source.dropped["bad_label"] == 1 and source.dropped["not_starting_with_user"] == 1
    assert source.dropped["withdrawn"] >= 1
    assert len(heldout_pairs(data.validation)) == 20 and {r["label"] for r in data.train} == {True, False}


# ---------------------------------------------------------------- preference rate

def test_preference_rate_scores_replies_on_the_training_mask(tiny_llama_dir, tmp_path):
    from training.evaluation.heldout import heldout_loss, load_for_loss
    from training.evaluation.preference_rate import preference_rate

    model, tok = load_for_loss(tiny_llama_dir)
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "How are you?"}]
    a, b = "Fine, thanks.", "I refuse to answer that question."
    ab = preference_rate(model, tok, [{"prompt": prompt, "chosen": a, "rejected": b}])
    ba = preference_rate(model, tok, [{"prompt": prompt, "chosen": b, "rejected": a}])
    assert ab["pairs"] == 1 and ab["logp_rate"] + ba["logp_rate"] == 1
    assert ab["logp_margin"] == pytest.approx(-ba["logp_margin"])
    # The margin is the difference of the replies' summed log-probabilities over the tokens training labels (the
    # earlier assistant turn is shared, so it cancels): what heldout_loss sums for the same conversations.
    total = lambda reply: -(lambda r: r["loss"] * r["tokens"])(  # noqa: E731
        heldout_loss(model, tok, [{"messages": prompt + [{"role": "assistant", "content": reply}]}]))
    assert ab["logp_margin"] == pytest.approx(total(a) - total(b), abs=1e-3)


def test_reward_accuracy_and_margin_are_what_trl_reports_for_dpo(small_vocab_llama_dir, tmp_path):
    """The held-out figures DPO optimises, computed by evaluate's code, equal TRL's own eval rewards/accuracies and
    rewards/margins for the same pairs (reference: the base, as in finetune's DPO runs), unlike the raw log-prob
    rate, which has no reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.config import LoraSection, ModelConfig
    from training.evaluation.preference_rate import pair_logps, preference_figures, preference_rate
    from training.finetune import training_arguments
    from training.trainer.modeling import load_model_for_training, plan_training
    from training.trainer.preference import build_preference_trainer

    tok = AutoTokenizer.from_pretrained(small_vocab_llama_dir)
    cfg = apply_overrides(TrainConfig(), {"model.name_or_path": str(small_vocab_llama_dir), "model.mode": "fp32",
                                          "train.objective": "dpo", "train.beta": 0.5, "train.max_length": 64,
                                          "train.output_dir": str(tmp_path), "train.report_to": "none",
                                          "train.per_device_eval_batch_size": 8, "train.optim": "adamw_torch"})
    plan = plan_training(cfg, str(small_vocab_llama_dir))
    model = load_model_for_training(str(small_vocab_llama_dir), ModelConfig(gradient_checkpointing=False),
                                    LoraSection(r=4, alpha=8), plan, tok)
    pairs = [{"prompt": [{"role": "user", "content": f"Tell me about {t}."}], "chosen": f"Sure: {t} are nice.",
              "rejected": "No."} for t in TOPICS[:6]]
    rows = [{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    trainer = build_preference_trainer(cfg, training_arguments(cfg, plan, has_eval=True), model, tok, rows, rows)
    torch.manual_seed(0)
    for name, p in model.named_parameters():  # "trained": LoRA B away from its zero start (TRL's "ref" copy keeps it)
        if "lora_B.default" in name:
            torch.nn.init.normal_(p, std=0.5)
    trl = trainer.evaluate()

    model.eval()
    with model.disable_adapter():
        reference = pair_logps(model, tok, pairs, 64)
    ours = preference_rate(model, tok, pairs, 64, reference=reference, beta=0.5)
    assert ours["reward_pairs"] == ours["pairs"] == 6
    assert ours["reward_accuracy"] == pytest.approx(trl["eval_rewards/accuracies"], abs=1e-6)
    assert ours["reward_margin"] == pytest.approx(trl["eval_rewards/margins"], rel=1e-3, abs=1e-4)
    assert 0 < ours["reward_accuracy"] < 1  # a mixed case: the comparison above means something
    # The reference scores itself 0 / 0; the raw rate has no reference and is unchanged by one.
    base = AutoModelForCausalLM.from_pretrained(small_vocab_llama_dir).eval()
    itself = preference_rate(base, tok, pairs, 64, reference=reference, beta=0.5)
    assert (itself["reward_accuracy"], itself["reward_margin"]) == (0, pytest.approx(0, abs=1e-6))
    assert preference_figures(pair_logps(model, tok, pairs, 64))["logp_rate"] == ours["logp_rate"]
    assert preference_figures(pair_logps(model, tok, pairs, 64))["reward_accuracy"] is None


def test_evaluate_reports_the_preference_rate_beside_the_loss(tiny_llama_dir, tmp_path):
    from training.evaluate import evaluate

    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": f"Q{i}"},
                                                             {"role": "assistant", "content": f"A{i}"}]} for i in range(3)])
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"Q{i}", "chosen": f"Yes {i}.", "rejected": "No."}
                                                   for i in range(5)])
    results = evaluate([("base", str(tiny_llama_dir)), ("same", str(tiny_llama_dir))], str(sft), tmp_path / "eval",
                       generation=False, preference_data=str(prefs), beta=0.5)
    base, same = results["rows"]
    assert base["loss"] > 0 and base["pairs"] == 5 and 0 <= base["logp_rate"] <= 1
    # The first model is the reference: it has no reward figures; a model equal to it has no reward either.
    assert base["preference_reference"] and base["reward_accuracy"] is None
    assert (same["reward_accuracy"], same["reward_margin"], same["reward_pairs"]) == (0, 0, 5)
    assert same["logp_rate"] == base["logp_rate"]
    assert results["data"]["preference_reference"] == "base/hf" and results["data"]["beta"] == 0.5
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "reward accuracy" in md and "log-prob rate (no reference)" in md
    assert "under the reference base/hf), beta 0.5" in md


# ---------------------------------------------------------------- the loop on a tiny model

def space_records(folder: Path, n: int, seed: int) -> list[dict]:
    """Ratings made through the Space's own feedback code: each reply registered as streamed to that visitor's
    session (what the chat does after every reply), then thumbs on some turns, a retry then a kept reply on others.
    Liked replies answer ("Sure: ..."), disliked ones refuse."""
    from chatbot.backends import GenerationParams
    from chatbot.backends.mock import MockBackend
    from chatbot.feedback import FeedbackCollector, FeedbackLog
    from chatbot.settings import load_settings

    settings = load_settings({"CHATBOT_BACKEND": "mock", "CHATBOT_FEEDBACK_DIR": str(folder)})
    log = FeedbackLog(folder)
    collector = FeedbackCollector(log, settings, MockBackend(settings))
    rng = random.Random(seed)
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        question = f"Tell me about {topic} (#{i})."
        good, bad = f"Sure: {topic} are nice, number {i}.", f"No. I refuse to talk about {topic}."
        msg = lambda role, text: {"role": role, "content": [{"type": "text", "text": text}]}  # noqa: E731
        session = f"visitor-{i}"

        def chat(reply: str) -> list[dict]:  # the reply streamed to this visitor; the chat as the page holds it
            collector.served(session, [{"role": "user", "content": question}], reply, "", GenerationParams(), 0)
            return [msg("user", question), msg("assistant", reply)]

        if rng.random() < 0.5:
            for reply, liked in ((good, True), (bad, False)):
                assert collector.on_like(session, chat(reply), 1, liked) is None
        else:
            assert collector.on_retry(session, chat(bad), 0) is None
            assert collector.on_submit(session, chat(good)) is None
    return [json.loads(line) for line in log.path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_model_dir(scaled_tiny_llama_dir):
    return scaled_tiny_llama_dir


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("space-feedback")
    records = space_records(folder, 48, seed=0)
    assert {r["rating"] for r in records} == {"up", "down", "retried", "kept"}
    return folder


def preference_cfg(records_dir, model_dir, out: Path, objective: str) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.sources = [SourceConfig(path=str(next(records_dir.glob("*.jsonl"))), format="feedback")]
    cfg.data.validation_fraction = 0.25
    return apply_overrides(cfg, {
        "model.name_or_path": str(model_dir), "model.mode": "fp32", "model.gradient_checkpointing": False,
        "lora.r": 8, "lora.alpha": 16, "train.output_dir": str(out), "train.max_length": 128,
        "train.objective": objective, "train.beta": 0.1, "train.max_steps": 24,
        "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 1,
        "train.learning_rate": 1e-2, "train.warmup_ratio": 0.0, "train.logging_steps": 4, "train.eval_steps": 12,
        "train.save_steps": 100, "train.report_to": "none", "train.optim": "adamw_torch",
        "export.merged_dtype": "float32", "export.gguf": True, "export.gguf_quants": ["f16"]})


@pytest.mark.parametrize("objective", ["kto", "dpo"])
def test_space_records_train_a_run_that_prefers_the_liked_replies(objective, records_dir, tiny_model_dir, tmp_path):
    import llama_cpp

    from training.data.preference import prepare_preference_data as prepare
    from training.evaluation.heldout import load_for_loss
    from training.evaluation.preference_rate import pair_logps, preference_figures, preference_rate
    from training.finetune import run

    cfg = preference_cfg(records_dir, tiny_model_dir, tmp_path / objective, objective)
    summary = run(cfg)
    out = Path(cfg.train.output_dir)
    pairs = heldout_pairs(prepare(cfg.data, objective, log=None).validation)
    assert len(pairs) == 12
    reference = pair_logps(*load_for_loss(tiny_model_dir), pairs, max_length=128)
    after = preference_rate(*load_for_loss(out / "merged"), pairs, max_length=128, reference=reference)
    assert after["pairs"] == after["reward_pairs"] == 12
    # What DPO / KTO optimise, against the base: the liked reply's reward above the disliked one's, on held-out prompts.
    assert after["reward_accuracy"] > 0.5 and after["reward_margin"] > 0
    assert after["logp_rate"] > preference_figures(reference)["logp_rate"]
    assert summary["steps"] == 24 and summary["final_eval_loss"] is not None
    assert f"| objective | {objective} (beta 0.1) |" in (out / "README.md").read_text()
    # The adapter holds the trained weights only (TRL's frozen reference copy is gone) and merges as for SFT.
    assert not (out / "adapter" / "ref").exists()
    (gguf,) = sorted((out / "gguf").glob("*.gguf"))
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=128, n_threads=1, verbose=False)
    assert llm.metadata.get("tokenizer.chat_template")


def ratings_file(path: Path, n: int) -> Path:
    """n prompts, each with a liked and a disliked reply (ratings: KTO reads them as they are, DPO pairs them)."""
    return write_jsonl(path, [{"prompt": f"Tell me about {TOPICS[i % len(TOPICS)]} (#{i}).", "completion": reply,
                               "label": liked} for i in range(n)
                              for reply, liked in ((f"Sure: number {i}.", True), ("No. I refuse.", False))])


@pytest.mark.parametrize("objective", ["kto", "dpo"])
def test_a_preference_run_stopped_by_sigterm_resumes_to_the_uninterrupted_weights(objective, small_vocab_llama_dir,
                                                                                  tmp_path, capsys):
    """A real interruption: SIGTERM at step 3 of 6 saves checkpoint-3 and exits 143; --resume finishes with the
    adapter of the run that was never stopped (TRL's frozen reference adapter is rebuilt, never saved). A dpo
    checkpoint is not resumed as sft."""
    from safetensors.torch import load_file

    from lost_machine_harness import signal_at
    from training.config import save_config
    from training.finetune import main, run

    data = ratings_file(tmp_path / "ratings.jsonl", 8)

    def cfg(out: str, **overrides) -> TrainConfig:
        cfg = TrainConfig()
        cfg.data.sources = [SourceConfig(path=str(data))]
        cfg.data.validation_fraction = 0.0
        return apply_overrides(cfg, {
            "model.name_or_path": str(small_vocab_llama_dir), "model.mode": "fp32",
            "model.gradient_checkpointing": False, "lora.r": 4, "lora.alpha": 8, "lora.target_modules": "q_proj,v_proj",
            "train.output_dir": str(tmp_path / out),
            "train.max_length": 48, "train.objective": objective, "train.max_steps": 6, "train.save_steps": 100,
            "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 1,
            "train.learning_rate": 5e-3, "train.warmup_ratio": 0.0, "train.logging_steps": 1,
            "train.report_to": "none", "train.optim": "adamw_torch", "export.merge": False, "export.gguf": False,
            **overrides})

    run(cfg("full"))
    with pytest.raises(SystemExit) as stopped:
        run(cfg("split"), callbacks=[signal_at(3)])
    assert stopped.value.code == 143
    assert sorted(p.name for p in (tmp_path / "split").glob("checkpoint-*")) == ["checkpoint-3"]
    resumed = run(cfg("split", **{"train.resume": True}))
    assert resumed["steps"] == 6 and resumed["resumed_from"] == "checkpoint-3"
    assert not (tmp_path / "split" / "adapter" / "ref").exists()
    full = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    split = load_file(tmp_path / "split" / "adapter" / "adapter_model.safetensors")
    assert full.keys() == split.keys() and full
    for k in full:
        torch_close(split[k], full[k], k)
    if objective == "dpo":
        recipe = save_config(cfg("split"), tmp_path / "recipe.yaml")
        capsys.readouterr()
        assert main(["--config", str(recipe), "--train.objective", "sft", "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "train.objective=dpo but the recipe has train.objective=sft" in err, err


def torch_close(a, b, name: str) -> None:
    import torch

    assert torch.allclose(a, b, atol=1e-6), (name, (a - b).abs().max().item())
