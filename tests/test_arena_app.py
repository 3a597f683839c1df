"""The Arena on the Space (chatbot/arena.py, arena_tab.py, arena_record.py): CHATBOT_ARENA_MODEL's settings, battles
and votes in-process, the /arena and /vote endpoints over real HTTP as a stranger calls them (`python app.py`, two
mock models), and the embedded SmolLM2 against a GGUF written by the repository's own export. What the Space writes
is read back with training's reader (training.data.arena_record.parse_battle) and becomes DPO pairs through the
preference loaders."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from chatbot.arena import MAX_BATTLES_PER_SESSION, Arena
from chatbot.backends.mock import MockBackend
from chatbot.feedback import FeedbackCollector, FeedbackLog
from chatbot.settings import arena_settings, load_settings
from tools import gradio_http
from tools.live_app import LiveApp, live_app
from training.data import SourceConfig, read_rows
from training.data.arena_record import parse_battle
from training.data.preference import dpo_rows, kto_rows, read_judgements

ROOT = Path(__file__).resolve().parent.parent
MOCKS = {"CHATBOT_BACKEND": "mock", "CHATBOT_MODEL": "alpha", "CHATBOT_ARENA_MODEL": "beta"}


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]


def as_training_data(folder: Path) -> tuple[list[dict], list[dict], Counter]:
    """The folder read as training reads the Space's feedback: (DPO rows, KTO rows, dropped records by reason)."""
    src = SourceConfig(path=str(folder), format="feedback")
    drops: Counter = Counter()
    _, pairs, ratings = read_judgements(src, read_rows(src), drops)
    return dpo_rows(pairs, ratings, drops), kto_rows(pairs, ratings), drops


# --- settings ------------------------------------------------------------------------------------------------

def run_app(env: dict) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("CHATBOT_", "GRADIO_"))}
    return subprocess.run([sys.executable, "app.py"], cwd=ROOT, env={**full, "HF_HUB_OFFLINE": "1", **env},
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("env, line", [
    ({"CHATBOT_BACKEND": "mock", "CHATBOT_ARENA_GGUF_FILE": "*.gguf"},
     ("CHATBOT_ARENA_GGUF_FILE='*.gguf' is not valid; accepted: a file name or glob inside CHATBOT_ARENA_MODEL, so "
      "CHATBOT_ARENA_MODEL must be set too")),
    ({"CHATBOT_BACKEND": "mock", "CHATBOT_MODEL": "same", "CHATBOT_ARENA_MODEL": "same"},
     "CHATBOT_ARENA_MODEL='same' is not valid; accepted: a model other than the chat's CHATBOT_MODEL"),
    ({"CHATBOT_ARENA_MODEL": "/no/such/model.gguf"},
     "CHATBOT_ARENA_MODEL='/no/such/model.gguf' does not exist; accepted: an existing local file or directory"),
])
def test_a_bad_arena_setting_is_one_line_naming_it_and_exit_2(env, line):
    result = run_app(env)
    assert result.returncode == 2 and result.stderr.strip().startswith(line), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_gguf_file_the_arena_model_lacks_names_the_arena_variables(tmp_path, smollm2_gguf):
    from chatbot.backends import load_arena_backend
    from chatbot.settings import ConfigError

    (tmp_path / "x-q8_0.gguf").symlink_to(smollm2_gguf)
    settings = load_settings({"CHATBOT_ARENA_MODEL": str(tmp_path), "CHATBOT_ARENA_GGUF_FILE": "*q4*.gguf"})
    with pytest.raises(ConfigError, match=r"^CHATBOT_ARENA_GGUF_FILE='\*q4\*.gguf' matches no file in .*x-q8_0.gguf"):
        load_arena_backend(settings)


def test_the_arena_model_is_served_like_the_chat_model_without_a_prompt_cache():
    settings = load_settings({"CHATBOT_MODEL": "me/tuned", "CHATBOT_GGUF_FILE": "*q4_k_m.gguf",
                              "CHATBOT_ARENA_MODEL": "me/base", "CHATBOT_ARENA_GGUF_FILE": "*q8_0.gguf",
                              "CHATBOT_THREADS": "2", "CHATBOT_TEMPERATURE": "0.7"})
    second = arena_settings(settings)
    assert (second.model, second.gguf_file, second.backend) == ("me/base", "*q8_0.gguf", "llama_cpp")
    assert (second.threads, second.temperature, second.cache_mb, second.arena_model) == (2, 0.7, 0, None)
    assert arena_settings(load_settings({})) is None


# --- battles and votes in-process ---------------------------------------------------------------------------

class SpyMock(MockBackend):
    """A mock model recording each request, and when its stream really ended."""

    def __init__(self, settings):
        super().__init__(settings)
        self.calls: list[dict] = []

    def count_tokens(self, messages):
        self.calls.append({"counted": messages})
        return super().count_tokens(messages)

    def stream(self, messages, params, cancel=None):
        call = {"params": params, "ended": threading.Event()}
        self.calls.append(call)
        try:
            yield from super().stream(messages, params, cancel)
        finally:
            call["ended"].set()


def arena(folder: Path | None = None, **env) -> Arena:
    settings = load_settings({**MOCKS, "CHATBOT_MOCK_DELAY": "0", **env,
                              **({"CHATBOT_FEEDBACK_DIR": str(folder)} if folder else {})})
    first, second = SpyMock(settings), SpyMock(arena_settings(settings))
    collector = FeedbackCollector(FeedbackLog(folder), settings, first) if folder else None
    return Arena(settings, first, second, collector)


def battle(a: Arena, message: str = "What is LoRA?", session: str = "tab") -> tuple[str, str, str, str]:
    *_, last = a.fight(message, session)
    return last


def test_a_battle_streams_both_models_in_random_order_and_the_vote_reveals_them(tmp_path):
    a = arena(tmp_path, CHATBOT_MOCK_DELAY="0.002")
    updates = list(a.fight("What is LoRA?", "tab"))
    battle_id, reply_a, reply_b, status = updates[-1]
    assert all(u[0] == "" for u in updates[:-1]) and len(battle_id) == 32  # the id once both are done
    assert len({(u[1], u[2]) for u in updates}) >= 4  # streamed, not one final message
    names = {reply_a.split("]")[0][1:], reply_b.split("]")[0][1:]}
    assert names == {"alpha", "beta"} and "Vote below" in status
    sides = [c for spy in (a.contenders[0].backend, a.contenders[1].backend) for c in spy.calls if "params" in c]
    assert len(sides) == 2 and not any(c["params"].keep_state for c in sides)  # the chat's cache is left alone
    assert all(r.endswith("You said: What is LoRA? | system prompt: You are a helpful assistant. | temperature=0.2 "
                          "top_p=0.9 max_new_tokens=512 repeat_penalty=1.2 min_p=0.05 | messages: 2")
               for r in (reply_a, reply_b))  # each to its last word: one reply ending does not stop the other
    shown = a.vote("tab", battle_id, "B")
    first = reply_a.split("]")[0][1:]
    assert shown.startswith(f"A was **{first}**, B was **{({'alpha', 'beta'} - {first}).pop()}**") \
        and "vote is saved" in shown
    (record,) = records(tmp_path)
    parsed = parse_battle(record)
    assert (parsed.battle_id, parsed.vote, parsed.winner.text, parsed.loser.text) == (battle_id, "B", reply_b, reply_a)
    assert parsed.replies["A"].name == first and record["replies"][0]["model"]["backend"] == "mock"
    assert parsed.messages == [{"role": "system", "content": "You are a helpful assistant."},
                               {"role": "user", "content": "What is LoRA?"}]
    seeds = [r["sampling"]["seed"] for r in record["replies"]]
    assert all(isinstance(s, int) for s in seeds) and seeds[0] != seeds[1]  # a fresh sample each side
    assert set(record["replies"][0]["sampling"]) == {"temperature", "top_p", "max_new_tokens", "repeat_penalty",
                                                     "min_p", "seed"}
    # Both models answered at the same time, each with the same prompt and settings but its own seed.
    calls = [c for m in a.contenders for c in m.backend.calls if "params" in c]
    assert len(calls) == 2 and calls[0]["params"].temperature == calls[1]["params"].temperature == 0.2


def test_the_order_is_random_and_each_label_names_the_model_that_wrote_it(tmp_path):
    a = arena(tmp_path)
    firsts = Counter()
    for i in range(16):
        battle_id, reply_a, _, _ = battle(a, f"Question {i}")
        a.vote("tab", battle_id, "A")
        firsts[reply_a.split("]")[0][1:]] += 1
    assert set(firsts) == {"alpha", "beta"}  # 2 × 0.5^16 to fail by chance
    for record in records(tmp_path):
        for reply in record["replies"]:
            assert reply["reply"].startswith(f"[{reply['model']['name']}]")


def test_votes_become_dpo_pairs_and_both_bad_two_undesirable_replies(tmp_path):
    a = arena(tmp_path)
    for vote in ("A", "B", "tie", "both_bad"):
        battle_id, *_ = battle(a, f"Which is better, {vote}?")
        a.vote("tab", battle_id, vote)
    assert all(parse_battle(r) for r in records(tmp_path))
    dpo, kto, drops = as_training_data(tmp_path)
    assert drops["tie_vote"] == 1
    decided = [r for r in records(tmp_path) if r["vote"] in ("A", "B")]
    want = sorted((r["messages"][-1]["content"], parse_battle(r).winner.text, parse_battle(r).loser.text)
                  for r in decided)
    got = sorted((d["prompt"][-1]["content"], d["chosen"][0]["content"], d["rejected"][0]["content"])
                 for d in dpo if d["prompt"][-1]["content"] != "Which is better, both_bad?")
    assert got == want
    both_bad = [k for k in kto if k["prompt"][-1]["content"] == "Which is better, both_bad?"]
    assert [k["label"] for k in both_bad] == [False, False]


def test_a_vote_counts_once_only_from_the_session_that_ran_the_battle(tmp_path):
    a = arena(tmp_path)
    battle_id, *_ = battle(a, session="tab")
    refused = [a.vote("other", battle_id, "A"), a.vote("never-seen", battle_id, "A"), a.vote("tab", "0" * 32, "A"),
               a.vote("tab", battle_id * 100, "A"), a.vote("tab", None, "A"), a.vote(None, battle_id, "A")]
    assert all(r.startswith("⚠️ That vote was not counted") for r in refused)
    assert a.vote("tab", battle_id, "C").startswith("⚠️ choice='C' is not valid; accepted: A, B, tie, both_bad")
    assert records(tmp_path) == []
    assert "vote is saved" in a.vote("tab", battle_id, "tie")
    assert a.vote("tab", battle_id, "A").startswith("⚠️ This battle's vote was already counted")
    assert [r["vote"] for r in records(tmp_path)] == ["tie"]
    assert "never-seen" not in a.sessions and a.refused == 6  # a stranger's vote leaves no state behind


def test_a_session_keeps_its_latest_battles_and_the_store_is_bounded(tmp_path):
    a = arena(tmp_path)
    ids = [battle(a, f"Question {i}")[0] for i in range(MAX_BATTLES_PER_SESSION + 1)]
    assert a.vote("tab", ids[0], "A").startswith("⚠️ That vote was not counted")  # the oldest was forgotten
    assert "saved" in a.vote("tab", ids[1], "A")
    charged = a.sessions.entries["tab"].nbytes
    ledger = a.sessions.use("tab")
    assert charged == sum(b.nbytes for b in ledger.battles.values()) + 100 * len(ledger.voted)


def test_messages_are_bounded_before_either_model_is_asked(tmp_path):
    a = arena(tmp_path, CHATBOT_MAX_INPUT_CHARS="50")
    assert battle(a, "x" * 51) == ("", "", "", ("⚠️ Your message is 51 characters long; the limit is 50 "
                                                "(CHATBOT_MAX_INPUT_CHARS). Please shorten it."))
    assert battle(a, "   ")[3] == "⚠️ Please type a message."
    assert battle(a, {"text": "x" * 51, "files": []})[3].startswith("⚠️ Your message is 51 characters long")
    assert all(c.backend.calls == [] for c in a.contenders)  # nothing was tokenised, nothing generated
    small = arena(tmp_path, CHATBOT_N_CTX="60", CHATBOT_MAX_NEW_TOKENS="40")
    too_long = battle(small, "word " * 30)
    assert too_long[0] == "" and too_long[3].startswith("⚠️ Your message is too long for this model")
    assert all("params" not in c for m in small.contenders for c in m.backend.calls)


def test_a_visitor_who_leaves_mid_battle_stops_both_models(tmp_path):
    a = arena(tmp_path, CHATBOT_MOCK_DELAY="0.2")
    fight = a.fight("Tell me a long story", "tab")
    while not next(fight)[1]:  # until A's first words are shown
        pass
    fight.close()
    ended = [c["ended"] for m in a.contenders for c in m.backend.calls if "ended" in c]
    assert len(ended) == 2 and all(e.wait(2) for e in ended)  # each returned at its next token
    assert len(a.sessions) == 0  # nothing to vote on


def test_votes_are_not_written_when_feedback_is_off_and_stop_at_the_feedback_limit(tmp_path):
    off = arena(None)
    battle_id, *_ = battle(off)
    assert off.vote("tab", battle_id, "A").endswith("(votes are not saved on this server).")
    (tmp_path / "old.jsonl").write_bytes(b"x" * 2**20)  # the folder already holds CHATBOT_FEEDBACK_MAX_MB=1
    full = arena(tmp_path, CHATBOT_FEEDBACK_MAX_MB="1")
    battle_id, *_ = battle(full)
    shown = full.vote("tab", battle_id, "A")
    assert shown.startswith("A was **") and "Ratings are no longer recorded" in shown
    assert [f.name for f in tmp_path.glob("*.jsonl")] == ["old.jsonl"]


# --- over real HTTP, as a stranger calls it: `python app.py` with two mock models ---------------------------

@pytest.fixture(scope="module")
def mock_app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arena-feedback")
    log = tmp_path_factory.mktemp("logs") / "app-arena.log"
    env = {**MOCKS, "CHATBOT_MOCK_DELAY": "0.005", "CHATBOT_FEEDBACK_DIR": str(folder)}
    with live_app(env, log) as app:
        app.folder = folder
        yield app


def call(app: LiveApp, api_name: str, data: list, session: str) -> list:
    """POST /gradio_api/call/NAME with a session hash, then its event stream: the final outputs (curl's way)."""
    with httpx.Client(timeout=60) as http:
        posted = http.post(f"{app.url}gradio_api/call/{api_name}", json={"data": data, "session_hash": session})
        posted.raise_for_status()
        with http.stream("GET", f"{app.url}gradio_api/call/{api_name}/{posted.json()['event_id']}") as events:
            last = None
            for line in events.iter_lines():
                if line.startswith("data:") and line[5:].strip() not in ("", "null"):
                    last = json.loads(line[5:])
    return last


def test_the_api_runs_a_battle_and_takes_one_vote_from_its_session(mock_app):
    from gradio_client import Client

    client = Client(mock_app.url, verbose=False)
    outputs = list(client.submit("Hello arena", api_name="/arena"))
    battle_id, reply_a, _, status = outputs[-1]
    assert len(outputs) >= 3 and battle_id and "You said: Hello arena" in reply_a and "Vote below" in status
    before = len(records(mock_app.folder))
    assert "vote is saved" in client.predict(battle_id, "A", api_name="/vote")
    assert client.predict(battle_id, "B", api_name="/vote").startswith("⚠️ This battle's vote was already counted")
    (record,) = records(mock_app.folder)[before:]
    assert parse_battle(record).vote == "A" and record["replies"][0]["reply"] == reply_a


def test_a_forged_or_repeated_vote_over_plain_http_is_refused_and_never_written(mock_app):
    session = uuid.uuid4().hex
    battle_id, reply_a, _, _ = call(mock_app, "arena", ["Plain HTTP battle"], session)
    assert battle_id and reply_a
    before = records(mock_app.folder)
    forged = [call(mock_app, "vote", [battle_id, "A"], uuid.uuid4().hex),      # someone else's battle
              call(mock_app, "vote", [uuid.uuid4().hex, "A"], session),        # a battle never run
              call(mock_app, "vote", ["x" * 100_000, "B"], session)]           # an oversized id
    # The page's own vote buttons, called by a stranger through POST /gradio_api/run/predict (no queue).
    config = httpx.get(f"{mock_app.url}config", timeout=30).json()
    button = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "arena-vote-A")
    click = next(d for d in config["dependencies"] if [t[0] for t in d["targets"]] == [button])
    posted = httpx.post(f"{mock_app.url}gradio_api/run/predict", timeout=30,
                        json={"data": [battle_id], "fn_index": click["id"], "session_hash": uuid.uuid4().hex})
    forged.append(posted.json()["data"])
    assert all(f[0].startswith("⚠️ That vote was not counted") for f in forged), forged
    assert records(mock_app.folder) == before
    assert "saved" in call(mock_app, "vote", [battle_id, "both_bad"], session)[0]
    assert call(mock_app, "vote", [battle_id, "A"], session)[0].startswith("⚠️ This battle's vote was already")
    assert [r["vote"] for r in records(mock_app.folder)[len(before):]] == ["both_bad"]
    assert "votes refused so far" in mock_app.output() and battle_id not in mock_app.output()


def test_no_caller_skips_the_queue_and_inputs_are_bounded(mock_app):
    for api_name, data in (("arena", ["flood"]), ("vote", ["x", "A"])):
        direct = httpx.post(f"{mock_app.url}gradio_api/run/{api_name}", json={"data": data}, timeout=30)
        assert direct.status_code == 404, api_name
    huge = gradio_http.final_output(gradio_http.join_queue(mock_app.url, "arena", ["x" * 9000]))
    assert huge == ["", "", "", ("⚠️ Your message is 9000 characters long; the limit is 8000 "
                                 "(CHATBOT_MAX_INPUT_CHARS). Please shorten it.")]


def test_the_chat_and_the_arena_share_the_models_slots(mock_app):
    """Every event that runs the model is one concurrency group: the browser chat's own events, /chat and /arena
    each had the backend's limit (4 for the mock), so together they sent it several times as many requests. Four
    battles and one chat call sent at once: the chat call starts only when a battle has ended."""
    from chatbot.backends import load_arena_backend, load_backend
    from chatbot.ui import MODEL_GROUP, build_app

    settings = load_settings(MOCKS)
    demo = build_app(settings, load_backend(settings), arena_backend=load_arena_backend(settings))
    groups = {fn.api_name: fn.concurrency_id for fn in demo.fns.values() if fn.queue is not False}
    assert {groups["chat"], groups["arena"], groups["_submit_fn"]} == {MODEL_GROUP} and groups["vote"] != MODEL_GROUP

    long = " ".join(["word"] * 300)  # the mock echoes it: 300 tokens of 5 ms, over a second a reply
    calls = [("arena", [long])] * 4 + [("chat", [long, None, "", 0.2, 0.9, 400, 1.2, 0.05])]
    times: list[dict] = [{} for _ in calls]

    def call_at(i: int) -> None:
        if i == len(calls) - 1:
            time.sleep(0.3)  # the battles are in first
        start = time.perf_counter()
        for seconds, message in gradio_http.join_queue(mock_app.url, *calls[i]):
            times[i].setdefault(message.get("msg"), start + seconds)

    threads = [threading.Thread(target=call_at, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first_battle_done = min(t["process_completed"] for t in times[:4])
    assert times[-1]["process_starts"] > first_battle_done - 0.2, times


def test_the_page_has_a_chat_tab_and_an_arena_tab_saying_votes_are_saved(mock_app):
    config = httpx.get(f"{mock_app.url}config", timeout=30).json()
    tabs = [c["props"].get("label") for c in config["components"] if c["type"] == "tabitem"]
    assert tabs == ["Chat", "Arena"]
    intro = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "arena-intro")
    assert "Prompts, replies and votes on this page are" in intro["props"]["value"]


def test_without_an_arena_model_the_app_has_no_tabs_and_no_arena_endpoints(tmp_path):
    with live_app({"CHATBOT_BACKEND": "mock"}, tmp_path / "app.log") as app:
        config = httpx.get(f"{app.url}config", timeout=30).json()
        info = httpx.get(f"{app.url}gradio_api/info", timeout=30).json()
    assert not [c for c in config["components"] if c["type"] in ("tabs", "tabitem")]
    assert set(info["named_endpoints"]) == {"/chat"}


# --- two real GGUFs: the embedded SmolLM2 and a GGUF written by the repository's export ----------------------

@pytest.fixture(scope="module")
def exported_gguf(tmp_path_factory, tiny_llama_dir):
    """A tiny Llama (random weights, SmolLM2's tokenizer and chat template) exported by training's GGUF export at
    q8_0: what the CPU recipe's export step writes, at a size a test can afford (the recipe's own SmolLM2 export
    takes minutes)."""
    from training.export.gguf import export_gguf

    (path,) = export_gguf(tiny_llama_dir, tmp_path_factory.mktemp("tiny-gguf"), ["q8_0"], progress=False, threads=1)
    return path


def test_the_embedded_model_against_an_exported_gguf(tmp_path, exported_gguf, smollm2_gguf):
    from gradio_client import Client

    folder = tmp_path / "feedback"
    env = {"CHATBOT_ARENA_MODEL": str(exported_gguf), "CHATBOT_THREADS": "1", "CHATBOT_MAX_NEW_TOKENS": "24",
           "CHATBOT_FEEDBACK_DIR": str(folder)}
    with live_app(env, tmp_path / "app.log") as app:
        assert f"Arena: {smollm2_gguf.name} against {exported_gguf.name}" in app.output()
        client = Client(app.url, verbose=False)
        votes = {}
        for vote, question in (("A", "What is the capital of France?"), ("both_bad", "Name a colour.")):
            *_, (battle_id, reply_a, reply_b, status) = client.submit(question, api_name="/arena")
            assert battle_id and reply_a.strip() and reply_b.strip() and reply_a != reply_b, status
            votes[battle_id] = client.predict(battle_id, vote, api_name="/vote")
    names = {f"embedded/{smollm2_gguf.name}", str(exported_gguf)}
    for shown in votes.values():
        assert shown.endswith("your vote is saved.") and all(f"**{n}**" in shown for n in names)
    battles = [parse_battle(r) for r in records(folder)]
    assert [b.battle_id for b in battles] == list(votes)
    assert all({r.name for r in b.replies.values()} == names for b in battles)
    assert battles[0].replies["A"].model["backend"] == "llama_cpp"
    dpo, kto, _ = as_training_data(folder)
    assert [(d["chosen"][0]["content"], d["rejected"][0]["content"]) for d in dpo] \
        == [(battles[0].winner.text.strip(), battles[0].loser.text.strip())]  # the loaders strip replies
    assert sum(1 for k in kto if k["label"] is False) == 3  # the pair's rejected reply and both bad replies
