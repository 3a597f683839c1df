"""training.data: every input shape from fixture rows (malformed ones included, exact counts), strict and
repaired, and loading through `datasets`. CPU, no network."""
from __future__ import annotations

import csv
import json
import random

import pytest

from training.data import DataConfig, DataError, SourceConfig, prepare_data

from data_fixtures import A, S, U, drops, prep, qa_rows, write_jsonl


# ----------------------------------------------------------------------------------------------------------
# Formats


def _messy_messages_rows():
    return [
        {"messages": [U("Hi"), A("Hello!")]},
        {"messages": [S("Be brief."), U("Q1"), A("A1"), U("Q2"), A("A2")]},
        {"messages": [{"role": "developer", "content": "Sys"}, U([{"type": "text", "text": "parts"}]), A("ok")]},
        {"messages": [U("  padded  "), A(" answer\n")]},
        {"other": 1},                                                 # missing_field
        {"messages": [U("Hi"), {"role": "assistant"}]},               # missing_field
        {"messages": [U("Hi"), A(42)]},                               # bad_type
        {"messages": "not a list"},                                   # bad_type
        {"messages": [U("Hi"), A("   ")]},                            # empty_turn
        {"messages": [U("Hi"), {"role": "tool", "content": "x"}]},     # unknown_role
        {"messages": [S("a"), S("b"), U("Hi"), A("x")]},              # multiple_system
        {"messages": [U("Hi"), S("late"), A("x")]},                   # system_not_first
        {"messages": [S("a"), U("Hi")]},                              # no_assistant_turn
        {"messages": []},                                             # no_assistant_turn
        {"messages": [A("first"), U("Hi"), A("x")]},                  # not_starting_with_user
        {"messages": [U("Hi"), U("again"), A("x")]},                  # not_alternating
        {"messages": [U("Hi"), A("x"), U("dangling")]},               # not_ending_in_assistant
    ]


def test_openai_messages_rows_and_every_malformed_reason_strict(tmp_path):
    rows = _messy_messages_rows()
    path = write_jsonl(tmp_path / "m.jsonl", rows, raw_lines=["{not json", "[1, 2]"])  # 2 x invalid_json
    result = prep(path, repair=False)
    rep = result.report.sources[0]
    assert (rep.format, rep.rows, rep.valid, rep.train) == ("messages", 19, 4, 4)
    assert rep.dropped == {"invalid_json": 2, "missing_field": 2, "bad_type": 2, "empty_turn": 1,
                           "unknown_role": 1, "multiple_system": 1, "system_not_first": 1,
                           "no_assistant_turn": 2, "not_starting_with_user": 1, "not_alternating": 1,
                           "not_ending_in_assistant": 1}
    got = sorted(json.dumps(r["messages"]) for r in result.train)
    want = sorted(json.dumps(m) for m in [[U("Hi"), A("Hello!")], rows[1]["messages"],
                                          [S("Sys"), U("parts"), A("ok")], [U("padded"), A("answer")]])
    assert got == want


def test_messy_messages_rows_are_repaired_by_default(tmp_path):
    rows = _messy_messages_rows()
    path = write_jsonl(tmp_path / "m.jsonl", rows, raw_lines=["{not json", "[1, 2]"])
    result = prep(path)
    rep = result.report.sources[0]
    assert (rep.rows, rep.valid, rep.whole, rep.trimmed) == (19, 9, 4, 5)
    assert rep.dropped == {"invalid_json": 2, "missing_field": 2, "bad_type": 2, "unknown_role": 1, "empty_turn": 1,
                           "no_assistant_turn": 2}
    assert rep.trimmed_by == {"leading_assistant": 1, "system_mid": 1, "merged_same_role": 2, "trailing_user": 1}
    for want in ([S("a\n\nb"), U("Hi"), A("x")], [U("Hi"), A("x")], [U("Hi\n\nagain"), A("x")]):
        assert {"messages": want} in result.train
    assert sum(r == {"messages": [U("Hi"), A("x")]} for r in result.train) == 3  # late system, leading A, dangling U


def test_sharegpt_finetome_rows(tmp_path):
    rows = [
        {"conversations": [{"from": "system", "value": "Sys"}, {"from": "human", "value": "Q"},
                           {"from": "gpt", "value": "A"}], "source": "x", "score": 4.5},
        {"conversations": [{"from": "user", "value": "Q1"}, {"from": "assistant", "value": "A1"},
                           {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]},
        {"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "role/content keys"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "tool", "value": "A"}]},  # unknown_role
        {"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "A"}]},  # missing_field
        {"source": "no conversations"},                                                       # missing_field
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},
                           {"from": "human", "value": "left hanging"}]},                      # not_ending_in_assistant
        {"conversations": [{"from": "gpt", "value": "A"}, {"from": "gpt", "value": "B"}]},    # not_starting_with_user
    ]
    path = write_jsonl(tmp_path / "ft.jsonl", rows)
    strict = prep(path, repair=False).report.sources[0]
    assert (strict.format, strict.valid) == ("sharegpt", 3)
    assert strict.dropped == {"missing_field": 2, "unknown_role": 1, "not_starting_with_user": 1,
                              "not_ending_in_assistant": 1}
    result = prep(path)
    rep = result.report.sources[0]
    assert (rep.format, rep.valid, rep.trimmed_by) == ("sharegpt", 4, {"trailing_user": 1})
    assert rep.dropped == {"missing_field": 2, "unknown_role": 1, "no_assistant_turn": 1}
    assert {"messages": [S("Sys"), U("Q"), A("A")]} in result.train
    assert {"messages": [U("Q1"), A("A1"), U("Q2"), A("A2")]} in result.train


def test_alpaca_rows_from_a_json_file(tmp_path):
    rows = [
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Say hi.", "output": "Hi!", "system": "Be kind."},
        {"instruction": "No output"},                                  # missing_field
        {"instruction": "  ", "input": "x", "output": "y"},            # empty_turn
        {"instruction": "Count.", "input": "", "output": 3},           # bad_type
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps({"data": rows}))  # wrapped in an object, as some exports are
    result = prep(path)
    rep = result.report.sources[0]
    assert (rep.format, rep.rows, rep.valid) == ("alpaca", 6, 3)
    assert rep.dropped == {"missing_field": 1, "empty_turn": 1, "bad_type": 1}
    assert {"messages": [U("Translate.\n\nBonjour"), A("Hello")]} in result.train
    assert {"messages": [U("Say hi."), A("Hi!")]} in result.train
    assert {"messages": [S("Be kind."), U("Say hi."), A("Hi!")]} in result.train


def test_openorca_rows_from_a_csv_file(tmp_path):
    path = tmp_path / "orca.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, ["id", "system_prompt", "question", "response"])
        w.writeheader()
        w.writerow({"id": 1, "system_prompt": "You are helpful.", "question": "2+2?", "response": "4"})
        w.writerow({"id": 2, "system_prompt": "", "question": "Capital of France?", "response": "Paris"})
        w.writerow({"id": 3, "system_prompt": "", "question": "Empty answer", "response": ""})  # empty_turn
        w.writerow({"id": 4, "system_prompt": "", "question": "", "response": "orphan"})         # empty_turn
    result = prep(path)
    rep = result.report.sources[0]
    assert (rep.format, rep.rows, rep.valid, rep.dropped) == ("openorca", 4, 2, {"empty_turn": 2})
    assert {"messages": [S("You are helpful."), U("2+2?"), A("4")]} in result.train
    assert {"messages": [U("Capital of France?"), A("Paris")]} in result.train


def test_guanaco_rows_from_a_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [
        "### Human: What is 2+2?### Assistant: 4",
        "### Human: Hi### Assistant: Hello!### Human: How are you?### Assistant: Fine.",
        "no markers at all",                                      # unparsable_text
        "Preamble ### Human: Q### Assistant: A",                  # unparsable_text
        "### Human: Q### Assistant:   ",                          # empty_turn
        "### Human: only a question",                             # no_assistant_turn
        "### Human: Q### Human: Q again### Assistant: A",         # not_alternating
        None,                                                     # missing_field
    ]
    path = tmp_path / "guanaco.parquet"
    pq.write_table(pa.table({"text": texts}), path)
    strict = prep(path, repair=False).report.sources[0]
    assert (strict.format, strict.rows, strict.valid) == ("guanaco", 8, 2)
    assert strict.dropped == {"missing_field": 1, "unparsable_text": 2, "empty_turn": 1, "no_assistant_turn": 1,
                              "not_alternating": 1}
    result = prep(path)
    rep = result.report.sources[0]
    assert (rep.valid, rep.trimmed_by) == (3, {"merged_same_role": 1})
    assert rep.dropped == {"missing_field": 1, "unparsable_text": 2, "empty_turn": 1, "no_assistant_turn": 1}
    assert {"messages": [U("Q\n\nQ again"), A("A")]} in result.train
    assert {"messages": [U("Hi"), A("Hello!"), U("How are you?"), A("Fine.")]} in result.train


def _utterances():
    # Two scenes, rows deliberately out of order (timestamp decides), plus two malformed utterances.
    scene1 = [("Ross", "We were on a break!"), ("Rachel", "No."), ("Monica", "Not again."),
              ("Ross", "Fine."), ("Ross", "Totally fine."), ("Joey", "How you doin'?"), ("Ross", "Joey, no.")]
    scene2 = [("Ross", "Dinosaurs!"), ("Chandler", "Could this BE more boring?"), ("Ross", "Yes.")]
    rows = []
    for conv, scene in (("s1", scene1), ("s2", scene2)):
        for t, (speaker, text) in enumerate(scene):
            rows.append({"id": f"{conv}-{t}", "conversation_id": conv, "speaker": speaker, "text": text,
                         "timestamp": t})
    random.Random(0).shuffle(rows)
    rows += [{"conversation_id": "s1", "text": "who said this?", "timestamp": 99},     # missing_field
             {"conversation_id": "s2", "speaker": "Ross", "text": " ", "timestamp": 98}]  # empty_turn
    return rows


def test_dialogue_windows_for_one_speaker(tmp_path):
    path = write_jsonl(tmp_path / "utterances.jsonl", _utterances())
    result = prep(path, assistant_speaker="ross", window=4, system="You are {speaker}.")
    rep = result.report.sources[0]
    # Ross speaks 4 times in s1 (the opener has no context -> no window) and twice in s2 (opener again).
    assert (rep.format, rep.rows, rep.valid) == ("dialogue", 12, 4)
    assert rep.dropped == {"missing_field": 1, "empty_turn": 1}
    sys = S("You are Ross.")
    want = [
        [sys, U("Rachel: No.\nMonica: Not again."), A("Fine.")],
        # window of 4 ending at "Totally fine.": two Ross turns in a row merge into one assistant turn
        [sys, U("Rachel: No.\nMonica: Not again."), A("Fine.\nTotally fine.")],
        # window ending at "Joey, no." starts with Ross's own turns, which are cut so that the user opens it
        [sys, U("Joey: How you doin'?"), A("Joey, no.")],
        [sys, U("Chandler: Could this BE more boring?"), A("Yes.")],
    ]
    assert sorted(json.dumps(r["messages"]) for r in result.train) == sorted(json.dumps(m) for m in want)


def test_dialogue_every_speaker_in_turn_and_unknown_speaker(tmp_path):
    path = write_jsonl(tmp_path / "utterances.jsonl", _utterances())
    result = prep(path, window=3)
    # every utterance but the two scene openers gets a window (7 - 1 + 3 - 1)
    assert result.report.sources[0].valid == 8
    assert {"messages": [U("Ross: Fine.\nRoss: Totally fine."), A("How you doin'?")]} in result.train
    assert all(r["messages"][-1]["role"] == "assistant" for r in result.train)
    with pytest.raises(DataError, match=r"assistant_speaker 'Phoebe' never speaks.*Ross"):
        prep(path, assistant_speaker="Phoebe")


def test_auto_detection_and_explicit_format_errors(tmp_path):
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(DataError, match=r"cannot detect the format.*completion.*prompt.*set format"):
        prep(odd)
    with pytest.raises(DataError, match=r"format='chatml'.*accepted: auto, messages, sharegpt"):
        prep(odd, fmt="chatml")
    # An explicit format overrides detection: these rows then lack the fields that format needs.
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"messages": [U("Hi"), A("Yo")]}])
    with pytest.raises(DataError, match=r"no usable training rows left; dropped by reason: missing_field 1"):
        prep(ok, fmt="alpaca")
    with pytest.raises(DataError, match=r"source path '.*missing.jsonl' not found"):
        prep(tmp_path / "missing.jsonl")


def test_convokit_corpus_dir_and_json_lines_named_json(tmp_path):
    corpus = tmp_path / "friends-corpus"
    corpus.mkdir()
    write_jsonl(corpus / "utterances.jsonl", _utterances())
    (corpus / "speakers.json").write_text("{}")  # the other corpus files are ignored
    rep = prep(corpus, assistant_speaker="Ross", window=4).report.sources[0]
    assert (rep.name, rep.format, rep.valid) == ("friends-corpus", "dialogue", 4)
    lines = write_jsonl(tmp_path / "lines.json", qa_rows(3), raw_lines=["oops"])
    assert drops(prep(lines)) == {"invalid_json": 1}


# ----------------------------------------------------------------------------------------------------------
# Loading through `datasets`


def test_dataset_directory_and_hub_ids_go_through_datasets(tmp_path, monkeypatch):
    import datasets

    rows = [{"messages": [U(f"Q{i}"), A(f"A{i}")]} for i in range(6)]
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)  # a folder of data files: datasets.load_dataset(folder)
    assert prep(folder).report.sources[0].valid == 6
    streamed = prepare_data(DataConfig(sources=[SourceConfig(str(folder), max_rows=4)], validation_fraction=0),
                            log=None)
    assert streamed.report.sources[0].rows == 4

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "test": datasets.Dataset.from_list(rows[4:])}).save_to_disk(str(saved))
    assert prep(saved).report.train_rows == 4
    assert prep(saved, split="test").report.train_rows == 2

    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
                for i in range(1000)]
        return datasets.Dataset.from_list(rows).to_iterable_dataset() if streaming else datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(sources=[SourceConfig("mlabonne/FineTome-100k", max_rows=500),
                              SourceConfig("Open-Orca/OpenOrca", subset="default", split="train[:1%]")],
                     dedup=False, validation_fraction=0)
    result = prepare_data(cfg, log=None)
    # max_rows on a Hub id streams (only the first shards are fetched); an explicit slice is passed through
    assert calls == [("mlabonne/FineTome-100k", None, "train", True), ("Open-Orca/OpenOrca", "default", "train[:1%]",
                                                                      False)]
    assert [s.rows for s in result.report.sources] == [500, 1000]
    assert [s.name for s in result.report.sources] == ["mlabonne/FineTome-100k", "Open-Orca/OpenOrca:default"]


def test_hub_failure_names_the_source(monkeypatch):
    import datasets

    def offline(*a, **kw):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not load source 'someone/data'.*ConnectionError: offline"):
        prep("someone/data")
