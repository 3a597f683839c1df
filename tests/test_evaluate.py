"""training/evaluate.py and its parts (training.evaluation.heldout, training.evaluation.judge, training.evaluation.report): held-out loss as
training masks it, the model comparison's outputs, generation metrics, the pairwise judge's bookkeeping and one-line
errors. Tiny random-weight models only; nothing is downloaded."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from training.evaluation.report import append_to_model_card
from training.evaluate import distinct_n, evaluate, generation_metrics, main, quant_label
from training.evaluation.heldout import heldout_loss, load_for_loss
from training.evaluation.judge import pairwise_win_rate

TOPICS = ["apples", "rivers", "clocks", "stars", "bread", "rain", "chess", "trains"]


def _rows(n: int, offset: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]} (#{i})."},
                          {"role": "assistant", "content": f"{TOPICS[i % len(TOPICS)].capitalize()} are nice. "
                                                           f"Number {i}."}]}
            for i in range(offset, offset + n)]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama_dir):
    """A few real finetune.py steps on repeated rows, exported to a q8_0 GGUF: a run dir like the CPU recipe's."""
    from training.config import TrainConfig, apply_overrides
    from training.data import SourceConfig
    from training.finetune import run

    tmp = tmp_path_factory.mktemp("eval-run")
    cfg = TrainConfig()
    cfg.data.sources = [SourceConfig(path=str(_write(tmp / "train.jsonl", _rows(16))), format="messages")]
    cfg.data.validation_path = str(_write(tmp / "valid.jsonl", _rows(4, offset=100)))
    apply_overrides(cfg, {"model.name_or_path": str(tiny_llama_dir), "model.mode": "fp32",
                          "model.gradient_checkpointing": False, "train.output_dir": str(tmp / "run"),
                          "train.max_length": 128, "train.max_steps": 12, "train.per_device_train_batch_size": 4,
                          "train.gradient_accumulation_steps": 1, "train.learning_rate": 5e-3,
                          "train.warmup_ratio": 0.0, "train.eval_steps": 0, "train.save_steps": 100,
                          "train.report_to": "none", "train.optim": "adamw_torch", "export.merged_dtype": "float32",
                          "export.gguf_quants": ["q8_0"]})
    run(cfg)
    return tmp / "run", Path(cfg.data.validation_path)


def test_perplexity_is_exp_of_mean_masked_token_loss(tiny_llama_dir):
    """Pooled over rows: total NLL of the label tokens / their count, checked against transformers' own
    per-row loss (which averages over the same labels), with padding and several batches in play."""
    import torch

    from training.chat_format import IGNORE_INDEX, encode_conversation

    rows = _rows(5) + [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Two questions: first, what are apples?"},
        {"role": "assistant", "content": "Apples are fruit that grow on trees in many colours."},
        {"role": "user", "content": "And rivers?"},
        {"role": "assistant", "content": "Rivers are water."}]}]
    model, tok = load_for_loss(tiny_llama_dir)
    got = heldout_loss(model, tok, rows, max_length=256, batch_tokens=64)  # forces several padded batches

    total, count, all_tokens = 0.0, 0, 0
    with torch.no_grad():
        for row in rows:
            ex = encode_conversation(tok, row["messages"], 256)
            n = sum(label != IGNORE_INDEX for label in ex["labels"][1:])
            loss = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss
            total += loss.item() * n
            count += n
            all_tokens += len(ex["input_ids"])
    assert got["tokens"] == count and 0 < count < all_tokens  # user/system/template tokens are not scored
    assert got["rows"] == len(rows) and got["skipped_rows"] == 0
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.mark.slow
def test_heldout_loss_is_lower_after_training(tiny_run, tiny_llama_dir):
    run_dir, valid = tiny_run
    rows = [json.loads(line) for line in valid.read_text().splitlines()]
    before = heldout_loss(*load_for_loss(tiny_llama_dir), rows)
    after = heldout_loss(*load_for_loss(run_dir / "merged"), rows)
    assert before["tokens"] == after["tokens"]  # same rows, same mask
    assert after["loss"] < before["loss"] - 0.1, (before, after)


@pytest.mark.slow
def test_compare_transformers_dir_and_gguf_writes_table_json_plot(tiny_run, tiny_llama_dir, tmp_path):
    run_dir, valid = tiny_run
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": "Tell me about rain (#3)."},
                                                  {"messages": [{"role": "user", "content": "Hi"}]}])
    out = tmp_path / "eval"
    results = evaluate([("base", str(tiny_llama_dir)), ("tuned", str(run_dir))], str(run_dir), out,
                       prompts=prompts, max_new_tokens=8, threads=1, n_ctx=256)

    rows = {(r["model"], r["variant"]): r for r in results["rows"]}
    assert set(rows) == {("base", "hf"), ("tuned", "hf"), ("tuned", "q8_0")}
    # --data RUN_DIR: the run's own held-out rows (here its validation_path file)
    assert results["data"]["rows"] == 4
    assert [json.loads(x) for x in (out / "heldout.jsonl").read_text().splitlines()] == \
        [json.loads(x) for x in valid.read_text().splitlines()]
    base, merged, q8 = rows["base", "hf"], rows["tuned", "hf"], rows["tuned", "q8_0"]
    assert merged["loss"] < base["loss"]
    assert q8["loss"] == pytest.approx(merged["loss"], rel=0.05)  # the dequantised q8_0 GGUF is nearly lossless
    # serving: the base (no GGUF) through the transformers backend, the tuned GGUF through llama.cpp
    assert base["backend"] == "transformers" and q8["backend"] == "llama_cpp" and merged["backend"] is None
    for r in (base, q8):
        assert r["answers"] == 2 and 0 < r["mean_new_tokens"] <= 8
        assert r["ttft_s"] > 0 and r["decode_tps"] > 0 and r["peak_rss_mib"] > 50
    # per process: llama.cpp serving a tiny GGUF needs far less than torch + transformers, and neither inherits
    # the peak of this test process
    assert q8["peak_rss_mib"] < base["peak_rss_mib"]
    assert len(results["answers"]["tuned/q8_0"]) == 2

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["rows"][0]["loss"] == pytest.approx(base["loss"])
    table = (out / "results.md").read_text()
    assert "| model | variant | held-out loss |" in table and "| tuned | q8_0 |" in table
    assert "tuned vs base" in table and "lower (better)" in table
    assert (out / "quality_vs_speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    card = _write(tmp_path / "README.md", [])
    card.write_text("# my model\n\nSome text.\n")
    append_to_model_card(card, out)
    append_to_model_card(card, out)  # replaces, never duplicates
    text = card.read_text()
    assert text.startswith("# my model") and text.count("## Evaluation") == 1 and "| tuned | q8_0 |" in text


def test_generation_metrics_and_distinct_n():
    assert distinct_n("the cat the cat the cat", 1) == pytest.approx(2 / 6)
    assert distinct_n("the cat the cat the cat", 2) == pytest.approx(2 / 5)
    assert distinct_n("one", 2) is None
    assert distinct_n("Lazy-Lazy-Lazy-Lazy", 1) == pytest.approx(2 / 7)  # a loop inside one hyphenated 'word'
    m = generation_metrics([{"text": "a b c d", "finish_reason": "stop", "tokens": 4},
                            {"text": "x x x x", "finish_reason": "length", "tokens": 8}])
    assert m["stop_rate"] == 0.5 and m["mean_new_tokens"] == 6
    assert m["distinct_1"] == pytest.approx((1 + 0.25) / 2)


def test_pairwise_judge_is_order_balanced():
    ref = [{"prompt": "q1", "text": "meh"}, {"prompt": "q2", "text": "meh"}]
    cand = [{"prompt": "q1", "text": "good answer"}, {"prompt": "q2", "text": "meh too"}]
    always_a = lambda messages: "A"  # noqa: E731 - position bias only
    assert pairwise_win_rate(always_a, ref, cand) == 0.5

    def prefers_good(messages):
        text = messages[-1]["content"]
        a = text.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
        b = text.split("Answer B:\n")[1].split("\n\nWhich")[0]
        return "A" if "good" in a else "B" if "good" in b else "T"

    assert pairwise_win_rate(prefers_good, ref, cand) == pytest.approx((1 + 0.5) / 2)
    assert pairwise_win_rate(prefers_good, cand, ref) == pytest.approx((0 + 0.5) / 2)


def test_quant_labels():
    assert quant_label(Path("model-q4_k_m.gguf")) == "q4_k_m"
    assert quant_label(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "q4_1"
    assert quant_label(Path("model-f16.gguf")) == "f16"
    assert quant_label(Path("weird.gguf")) == "weird"


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", _rows(2))
    assert main(["--model", f"x={tmp_path / 'missing'}", "--data", str(data), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model x=" in err and "accepted" in err
    assert main(["--model", "nameonly", "--data", str(data)]) == 2
    assert "NAME=SPEC" in capsys.readouterr().err
    assert main(["--model", f"a={tmp_path}", "--data", str(data), "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens=0" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(["--model", "a=embedded", "--data", str(bad), "--no-generation", "--out", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err
    # Preference data with no pair in it (two plain conversations).
    assert main(["--model", "a=embedded", "--data", str(data), "--preference-data", str(data), "--no-generation",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --preference-data") and "accepted" in err


@pytest.mark.parametrize("option", ["--data", "--preference-data"])
def test_a_bad_recipe_is_one_line_and_exit_2(tmp_path, capsys, option):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  max_length: -5\n")
    data = str(_write(tmp_path / "d.jsonl", _rows(2)))
    args = ["--data", str(recipe)] if option == "--data" else ["--data", data, "--preference-data", str(recipe)]
    assert main(["--model", "a=embedded", *args, "--no-generation", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {option} {str(recipe)!r}: ") and "train.max_length" in err


def test_each_recipe_is_loaded_once(tmp_path, monkeypatch):
    import training.config
    from training.evaluate import load_recipes, scoring_length

    loads = []
    real = training.config.load_config
    monkeypatch.setattr(training.config, "load_config", lambda path, *a, **k: loads.append(path) or real(path, *a, **k))
    recipe = Path(__file__).resolve().parent.parent / "training" / "configs" / "smollm2-135m-cpu.yaml"
    recipes = load_recipes(data=str(recipe), preference_data=str(recipe), other=None)
    assert loads == [recipe] and recipes["data"] is recipes["preference_data"] and recipes["other"] is None
    assert scoring_length(None, None, recipes["data"]) == (recipes["data"].config.train.max_length,
                                                         f"train.max_length of {recipe}")
    assert scoring_length(7, recipes["data"]) == (7, "--max-length")


def test_a_model_card_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    import training.evaluate

    results = {"rows": [{"model": "a", "variant": "q4_k_m", "loss": 1.0}], "data": {}, "generation": {}}
    monkeypatch.setattr(training.evaluate, "evaluate", lambda *a, **k: results)  # the card, not the comparison
    data = str(_write(tmp_path / "d.jsonl", _rows(2)))
    for card in (tmp_path, tmp_path / "no-such-folder" / "README.md"):  # IsADirectoryError, FileNotFoundError
        assert main(["--model", "a=embedded", "--data", data, "--model-card", str(card)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: --model-card={card} could not be written (")
    assert main(["--model", "a=embedded", "--data", data, "--model-card", str(tmp_path / "README.md")]) == 0
    assert "## Evaluation" in (tmp_path / "README.md").read_text()


def test_finetune_eval_loss_and_evaluate_heldout_loss_agree(tmp_path, small_vocab_llama_dir):
    """One figure for one model on one recipe's held-out rows: finetune's eval loss (summary.json) and evaluate.py's
    held-out loss of the merged model, with rows of 1-3 turns cut at the recipe's train.max_length (28 tokens) and
    evaluated two at a time: both cut at the recipe's length and pool the NLL over all rows' tokens (Trainer's own
    eval loss averages per-batch means, which differ here: the rows have 7 to 10 labelled tokens)."""
    from training.config import TrainConfig, apply_overrides
    from training.data import SourceConfig
    from training.finetune import run

    def rows(n: int, offset: int) -> list[dict]:  # replies of 7 or 10 tokens, 1 to 3 turns
        turn = lambda i: [{"role": "user", "content": f"Tell me about {TOPICS[i % 8]} (#{i})."},  # noqa: E731
                          {"role": "assistant", "content": f"{TOPICS[i % 8]} are nice." + " Number {i}." * (1 + i % 2)}]
        return [{"messages": turn(i) * (1 + i % 3)} for i in range(offset, offset + n)]

    cfg = TrainConfig()
    cfg.data.sources = [SourceConfig(path=str(_write(tmp_path / "train.jsonl", rows(8, 0))), format="messages")]
    cfg.data.validation_path = str(_write(tmp_path / "valid.jsonl", rows(5, 100)))
    apply_overrides(cfg, {"model.name_or_path": str(small_vocab_llama_dir), "model.mode": "fp32",
                          "model.gradient_checkpointing": False, "train.output_dir": str(tmp_path / "run"),
                          "train.max_length": 28, "train.max_steps": 2, "train.per_device_train_batch_size": 4,
                          "train.per_device_eval_batch_size": 2, "train.gradient_accumulation_steps": 1,
                          "train.learning_rate": 5e-2, "train.warmup_ratio": 0.0, "train.eval_steps": 0,
                          "train.save_steps": 100, "train.report_to": "none", "train.optim": "adamw_torch",
                          "export.merged_dtype": "float32", "export.gguf": False})
    summary = run(cfg)
    results = evaluate([("tuned", str(tmp_path / "run"))], str(tmp_path / "run"), tmp_path / "eval", generation=False)
    (row,) = results["rows"]
    assert results["data"]["max_length"] == 28 and row["rows"] == 5
    assert row["loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    assert "cut at 28 tokens (train.max_length of" in (tmp_path / "eval" / "results.md").read_text()
    # Asked for another length, it says so, and the cut matters here.
    longer = evaluate([("tuned", str(tmp_path / "run"))], str(tmp_path / "run"), tmp_path / "eval2",
                      generation=False, max_length=2048)
    assert longer["data"]["max_length"] == 2048 and abs(longer["rows"][0]["loss"] - row["loss"]) > 1e-3
    assert "cut at 2048 tokens (--max-length)" in (tmp_path / "eval2" / "results.md").read_text()
