"""training.data: the data-centric filters, mixing, the split, the report and CLI, and the shipped sample.
CPU, no network."""
from __future__ import annotations

import json
import random

import pytest

from training import data as D
from training.data import DataConfig, DataError, SourceConfig, prepare_data

from data_fixtures import REPO, SAMPLE, A, U, drops, prep, qa_rows, write_jsonl


# ----------------------------------------------------------------------------------------------------------
# Data-centric filters


def test_exact_dedup_folds_case_and_spacing(tmp_path):
    rows = qa_rows(20)
    dups = [json.loads(json.dumps(rows[i])) for i in (0, 3, 3, 7)]
    for d in dups:
        d["messages"][0]["content"] = "  " + d["messages"][0]["content"].upper().replace(" ", "   ")
    path = write_jsonl(tmp_path / "d.jsonl", rows + dups)
    assert prep(path, dedup=False).report.train_rows == 24
    deduped = prep(path, dedup=True)
    assert deduped.report.train_rows == 20
    assert drops(deduped) == {"duplicate": 4}
    assert {json.dumps(r) for r in deduped.train} == {json.dumps(r) for r in rows}


def test_near_dedup_removes_rewordings_only(tmp_path):
    long_answer = ("Fine-tuning continues training a pretrained model on your own examples so that it adopts "
                   "their task and style; it needs far less data and compute than training from scratch.")
    rows = qa_rows(40)
    rows.append({"messages": [U("What is fine-tuning?"), A(long_answer)]})
    near = [{"messages": [U("What is fine-tuning??"), A(long_answer)]},
            {"messages": [U("what is FINE-tuning?"), A(long_answer.replace("far less", "much less"))]}]
    far = {"messages": [U("What is fine-tuning?"), A("It adapts a model to your data.")]}
    path = write_jsonl(tmp_path / "n.jsonl", rows + near + [far])
    plain = prep(path, dedup=True)
    assert plain.report.train_rows == 44  # exact dedup does not see them
    result = prep(path, dedup=True, near_dedup=0.8)
    assert drops(result) == {"near_duplicate": 2}
    assert result.report.train_rows == 42
    assert far in result.train


def test_near_dedup_mask_matches_true_jaccard():
    rng = random.Random(1)
    words = [f"tok{i}" for i in range(400)]
    base = [" ".join(rng.choices(words, k=80)) for _ in range(30)]
    # one near copy per base text: four words replaced (Jaccard of the 5-shingles ~0.83)
    near = [" ".join("CHANGED" if j in (10, 30, 50, 70) else w for j, w in enumerate(t.split())) for t in base]
    mask = D.near_dedup_mask(base + near, threshold=0.7)
    assert mask == [True] * 30 + [False] * 30
    assert D.near_dedup_mask(base, threshold=0.7) == [True] * 30
    assert D.near_dedup_mask(base + near, threshold=0.95) == [True] * 60


def test_min_score_filters_only_scored_rows(tmp_path):
    def row(i, score):
        r = {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
        if score is not None:
            r["score"] = score
        return r

    path = write_jsonl(tmp_path / "s.jsonl", [row(0, 3.2), row(1, 4.0), row(2, 5.1), row(3, None), row(4, "4.5"),
                                             row(5, "n/a")])
    result = prep(path, min_score=4.0)
    assert drops(result) == {"low_score": 1}
    assert result.report.train_rows == 5
    assert prep(path).report.train_rows == 6


def test_length_filter_counts_templated_tokens(tmp_path, smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    rows = [{"messages": [U("Hi"), A(" ".join(["Hello"] * n))]} for n in (1, 5, 20, 60, 120)]
    path = write_jsonl(tmp_path / "l.jsonl", rows)
    lengths = [len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
               for r in rows]
    assert D.token_lengths(tok, [r["messages"] for r in rows]) == lengths
    assert lengths == sorted(lengths) and len(set(lengths)) == 5
    result = prep(path, tokenizer=tok, min_tokens=lengths[1], max_tokens=lengths[3])
    assert drops(result) == {"too_short": 1, "too_long": 1}
    assert sorted(result.report.train_lengths) == lengths[1:4]
    assert result.report.length_unit == "tokens"
    with pytest.raises(DataError, match="min_tokens/max_tokens need a tokenizer"):
        prep(path, max_tokens=10)


# ----------------------------------------------------------------------------------------------------------
# Mixing and the split


def test_mixing_by_weight_and_max_rows(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", qa_rows(10, "Alpha"))
    b = write_jsonl(tmp_path / "b.jsonl", qa_rows(20, "Beta"))

    def mixed(max_rows=None, seed=42):
        cfg = DataConfig(sources=[SourceConfig(a, weight=2.0), SourceConfig(b, weight=0.5)], max_rows=max_rows,
                         validation_fraction=0, seed=seed)
        return prepare_data(cfg, log=None)

    def origin(result):
        return [r["messages"][0]["content"].split()[0] for r in result.train]

    full = mixed()
    assert [s.train for s in full.report.sources] == [20, 10]
    assert origin(full).count("Alpha") == 20 and origin(full).count("Beta") == 10
    assert len({json.dumps(r) for r in full.train if "Alpha" in json.dumps(r)}) == 10  # every Alpha row twice
    capped = mixed(max_rows=15)
    assert [s.train for s in capped.report.sources] == [10, 5] and capped.report.train_rows == 15
    assert mixed().train == full.train  # seeded
    assert mixed(seed=7).train != full.train
    assert D.mix_counts([3, 3, 3], [1, 1, 1], 4) == [2, 1, 1]
    assert D.mix_counts([10, 0], [1, 5], None) == [10, 0]


def long_conversation(i: int, exchanges: int = 12) -> dict:
    return {"messages": [m for j in range(exchanges) for m in (U(f"Long {i}, question {j}: " + "and then? " * 6),
                                                                A(f"Part {j} of answer {i}. " + "more " * 20))]}


@pytest.fixture
def token_calls(monkeypatch):
    """Every conversation the pipeline measures in tokens (the costly step), counted."""
    from training.data import pipeline

    measured = []
    real = pipeline.token_lengths

    def counted(tokenizer, conversations, *args, **kwargs):
        measured.extend(conversations)
        return real(tokenizer, conversations, *args, **kwargs)

    monkeypatch.setattr(pipeline, "token_lengths", counted)
    return measured


def test_max_rows_tokenises_only_what_the_mix_needs(tmp_path, smollm2_tokenizer_dir, token_calls):
    """data.max_rows used to be applied after every conversation was tokenised and windowed (minutes on a big
    ShareGPT file); now only about the rows the mix takes are. The held-out rows stay the same."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    rows = qa_rows(1500) + [long_conversation(i) for i in range(100)]
    random.Random(0).shuffle(rows)
    path = write_jsonl(tmp_path / "big.jsonl", rows)

    def run(max_rows, seed=42):
        token_calls.clear()
        result = prep(path, tokenizer=tok, max_length=256, validation_fraction=0.05, max_rows=max_rows, seed=seed)
        return result, len(token_calls) - len(result.validation)  # the report measures the held-out rows too

    full, measured_all = run(None)
    capped, measured = run(60)
    assert capped.report.train_rows == 60 and measured_all == 1600 - 80 and measured <= 256
    assert full.report.sources[0].processed is None
    rep = capped.report.sources[0]
    assert rep.processed == measured and rep.pool == 1520
    assert f"filled from {measured} of its 1520 training conversations" in capped.report.summary()
    assert capped.validation == full.validation  # every variant is still scored on the same held-out rows
    full_rows = {json.dumps(r) for r in full.train}
    assert all(json.dumps(r) in full_rows for r in capped.train)  # windows of the same conversations
    assert run(60)[0].train == capped.train and run(60, seed=7)[0].train != capped.train
    assert run(10_000)[0].train == full.train  # a cap above the total changes nothing


def test_mix_processed_fills_each_share_from_a_seeded_order():
    """Weights still set the shares under the cap; a source wanted whole (weight 30) is processed to the end."""
    processed = []

    def process(source, items):
        processed.extend((source, x) for x in items)
        return [[x] * (2 if x % 10 == 0 else 1) if x % 7 else [] for x in items]  # windows and drops, like tokens

    parts = [list(range(3000)), list(range(100))]
    mixed = D.mix_processed(parts, [1.0, 30.0], 600, process, seed=1)
    sizes = [len(m.rows) for m in mixed]
    # after `process` the sources hold ~2830 and 95 rows: 30 x 95 ~ 2830, so about half and half
    assert sum(sizes) == 600 and 270 <= sizes[1] <= 330
    assert mixed[1].processed == 100 and mixed[0].processed < 600
    assert all(mixed[1].rows.count(x) >= 2 for x in mixed[1].rows)  # whole copies of a source wanted > once
    assert sum(1 for s, _ in processed if s == 0) == mixed[0].processed
    assert all(x % 7 for m in mixed for x in m.rows)
    again = D.mix_processed(parts, [1.0, 30.0], 600, process, seed=1)
    assert [m.rows for m in again] == [m.rows for m in mixed]
    uncapped = D.mix_processed(parts, [1.0, 0.5], None, process, seed=1)
    assert [m.processed for m in uncapped] == [3000, 100]  # no cap: everything, mixed as before

def test_split_is_seeded_and_independent_of_the_filters(tmp_path):
    rows = qa_rows(60)
    rows += [json.loads(json.dumps(r)) for r in rows[:10]]  # exact duplicates
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    raw = prep(path, validation_fraction=0.1)
    again = prep(path, validation_fraction=0.1)
    deduped = prep(path, validation_fraction=0.1, dedup=True)
    other_seed = prep(path, validation_fraction=0.1, seed=1)
    assert len(raw.validation) == 7 and raw.validation == again.validation and raw.train == again.train
    assert deduped.validation == raw.validation  # same held-out rows whatever the filters
    assert other_seed.validation != raw.validation
    held = {json.dumps(v) for v in raw.validation}
    assert not any(json.dumps(t) in held for t in raw.train + deduped.train)
    # duplicates of held-out rows are removed from train even with dedup off
    n_leaks = sum(json.dumps(r) in held for r in rows) - len(raw.validation)
    assert raw.report.sources[0].dropped.get("in_validation", 0) == n_leaks
    assert raw.report.train_rows == 70 - 7 - n_leaks
    capped = prep(path, validation_fraction=0.1, max_validation_rows=3)
    assert len(capped.validation) == 3 and all(v in raw.validation for v in capped.validation)


def test_fixed_validation_file(tmp_path):
    rows = qa_rows(12)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", rows[:2] + [{"messages": [U("only in val"), A("ok")]}, {"bad": 1}])
    result = prep(train, validation_path=val, validation_fraction=0.5)
    assert len(result.validation) == 3
    assert drops(result) == {"in_validation": 2}
    assert result.report.train_rows == 10


def test_nothing_usable_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [U("Hi")]}, {"messages": [A("x")]}],
                       raw_lines=["oops"])
    with pytest.raises(DataError, match="no usable training rows left; dropped by reason: invalid_json 1, "
                                        "no_assistant_turn 2"):
        prep(path, fmt="messages")
    with pytest.raises(DataError, match="no usable training rows left; dropped by reason: invalid_json 1, "
                                        "no_assistant_turn 1, not_starting_with_user 1"):
        prep(path, fmt="messages", repair=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"validation_fraction": 1.0}, r"validation_fraction=1.0; accepted: 0 <= value < 1"),
    ({"near_dedup": 1.5}, r"near_dedup=1.5; accepted"),
    ({"max_rows": 0}, r"max_rows=0; accepted: an integer >= 1"),
    ({"weight": -1}, r"weight=-1 for source .*; accepted: a number >= 0"),
])
def test_bad_options_are_one_line_errors(tmp_path, kwargs, match):
    path = write_jsonl(tmp_path / "ok.jsonl", qa_rows(3))
    with pytest.raises(DataError, match=match):
        prep(path, **kwargs)


def test_no_sources_is_an_error():
    with pytest.raises(DataError, match="DataConfig.sources is empty"):
        prepare_data(DataConfig(), log=None)


# ----------------------------------------------------------------------------------------------------------
# Report and the shipped sample


def test_report_summary_json_and_plot(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", qa_rows(30) + [{"messages": [U("x")]}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "Say hi.", "output": "Hi"}] * 3)
    lines = []
    cfg = DataConfig(sources=[SourceConfig(a), SourceConfig(b)], validation_fraction=0.1)
    result = prepare_data(cfg, log=lines.append)
    rep = result.report
    # a: 30 valid, round(10%) = 3 held out; b: 3 identical rows, round(0.3) = 0 held out, 2 duplicates dropped
    assert rep.dropped == {"no_assistant_turn": 1, "duplicate": 2}
    assert (rep.train_rows, rep.validation_rows) == (28, 3)
    assert lines == ["data: reading a.jsonl", "data: reading b.jsonl", rep.summary()]
    assert ("a.jsonl [messages]: 31 rows read, 30 valid (96.8% kept: 30 whole, 0 trimmed), 3 held out, 27 kept "
            "after filters, 27 in the training mix") in rep.summary()
    assert "kept 97.1% of the conversations read" in rep.summary()  # (30 + 3) / (31 + 3)
    assert "dropped in total: no_assistant_turn 1, duplicate 2" in rep.summary()
    report_path, plot_path = rep.write(tmp_path / "out")
    saved = json.loads(report_path.read_text())
    assert saved["dropped"] == rep.dropped and saved["train_rows"] == rep.train_rows
    assert sum(saved["length_histogram"]["train"]) == rep.train_rows
    assert sum(saved["length_histogram"]["validation"]) == rep.validation_rows
    assert saved["config"]["sources"][1]["path"] == b
    assert saved["kept_fraction"] == 33 / 34 and saved["sources"][0]["kept_fraction"] == 30 / 31
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shipped_sample_loads_cleanly_and_matches_its_generator(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_sample", REPO / "training" / "samples" / "make_sample.py")
    make_sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_sample)

    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    assert 300 <= len(lines) <= 500 and SAMPLE.stat().st_size < 1_000_000
    assert [json.loads(l) for l in lines] == make_sample.build()  # the committed file is the generator's output

    raw = prep(SAMPLE)
    assert raw.report.sources[0].dropped == {} and raw.report.train_rows == len(lines)
    kinds = [len(r["messages"]) for r in raw.train]
    assert sum(r["messages"][0]["role"] == "system" for r in raw.train) > 50
    assert sum(k >= 4 for k in kinds) > 30  # multi-turn
    deduped = prep(SAMPLE, dedup=True)
    near = prep(SAMPLE, dedup=True, near_dedup=0.85)
    assert deduped.report.dropped.get("duplicate", 0) >= 10  # the ten planted ones, at least
    assert near.report.dropped.get("near_duplicate", 0) >= 5
    default = prepare_data(DataConfig(sources=[SourceConfig(str(SAMPLE))]), log=None)
    assert 15 <= default.report.validation_rows <= 25


def test_example_files_for_each_format():
    folder = REPO / "training" / "samples" / "examples"
    expect = {"sharegpt.jsonl": ("sharegpt", 3), "alpaca.json": ("alpaca", 2), "openorca.csv": ("openorca", 2),
              "guanaco.jsonl": ("guanaco", 2), "dialogue.jsonl": ("dialogue", 8)}
    for name, (fmt, valid) in expect.items():
        rep = prep(folder / name).report.sources[0]
        assert (rep.format, rep.valid, rep.dropped) == (fmt, valid, {}), name


def test_data_config_from_dict():
    cfg = D.data_config_from_dict({"sources": ["a.jsonl", {"path": "b/c", "weight": 0.5, "subset": "x"}],
                                   "near_dedup": 0.9, "max_rows": 100})
    assert cfg.sources == [SourceConfig("a.jsonl"), SourceConfig("b/c", weight=0.5, subset="x")]
    assert (cfg.near_dedup, cfg.max_rows, cfg.dedup) == (0.9, 100, True)
    with pytest.raises(DataError, match=r"unknown option data.dedupe; accepted: sources, dedup, near_dedup"):
        D.data_config_from_dict({"dedupe": True})
    with pytest.raises(DataError, match=r"unknown option data.sources\[1\].wieght; accepted: path, format"):
        D.data_config_from_dict({"sources": ["a.jsonl", {"path": "b", "wieght": 2}]})


def test_tokenizer_without_chat_template_is_a_clear_error(tmp_path):
    class NoTemplate:
        chat_template = None

    path = write_jsonl(tmp_path / "ok.jsonl", qa_rows(3))
    with pytest.raises(DataError, match="the tokenizer has no chat_template"):
        prep(path, tokenizer=NoTemplate(), max_tokens=100)


def test_cli_prints_the_summary_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "report"
    D.main([str(SAMPLE), "--near-dedup", "0.85", "--out", str(out)])
    printed = capsys.readouterr().out
    n = len(SAMPLE.read_text().splitlines())
    assert f"sample.jsonl [messages]: {n} rows read, {n} valid" in printed
    assert (out / "data_report.json").exists() and (out / "data_lengths.png").exists()
    with pytest.raises(SystemExit) as exit_info:
        D.main(["nope.jsonl"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: source path 'nope.jsonl' not found")


def test_repo_relative_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rep = prep("training/samples/examples/alpaca.json").report.sources[0]
    assert (rep.name, rep.valid) == ("alpaca.json", 2)
    with pytest.raises(DataError, match=r"data.sources\[0\]: .*path"):
        D.data_config_from_dict({"sources": [{"weight": 2}]})
