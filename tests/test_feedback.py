"""Visitor feedback (chatbot/feedback.py): with CHATBOT_FEEDBACK_DIR set, thumbs sent to the real Gradio server the way
the browser sends them land in the JSONL - only for replies that server streamed in that session, with the system
prompt and settings the reply was generated with; retried and kept replies make a pair; the per-record,
per-session and total limits stop writing (the page says so, nothing saved is lost); with feedback unset nothing is
attached or written; concurrent writers never interleave; CHATBOT_FEEDBACK_DATASET pushes through huggingface_hub's
CommitScheduler to a local stand-in for the Hub, and once more on close."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from chatbot import feedback
from chatbot.backends.mock import MockBackend
from chatbot.feedback import FeedbackCollector, FeedbackLog, notice
from chatbot.settings import ConfigError, load_settings
from chatbot.ui import make_respond
from tests.local_hub import LocalHub
from tools.ports import free_port


def read_records(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]


def browser_message(role: str, text: str) -> dict:
    """A chat message as Gradio 6's frontend sends the Chatbot value back to the server."""
    return {"role": role, "content": [{"type": "text", "text": text}], "metadata": None, "options": None}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from chatbot.ui import build_app

    folder = tmp_path_factory.mktemp("feedback")
    settings = load_settings({"CHATBOT_BACKEND": "mock", "CHATBOT_MOCK_DELAY": "0", "CHATBOT_FEEDBACK_DIR": str(folder)})
    demo = build_app(settings, MockBackend(settings))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", demo=demo, folder=folder)
    demo.close()


def trigger(app, handler: str, data: list, event_data: dict | None, session: str):
    """Fire one of feedback.attach's listeners over HTTP exactly as the browser does (POST run/predict with the
    component values, the event's data and the page's session hash); what it showed on the page."""
    import httpx

    fn_index = next(i for i, f in app.demo.fns.items() if getattr(f.fn, "__name__", "") == handler)
    r = httpx.post(f"{app.url}gradio_api/run/predict", timeout=30,
                   json={"data": data, "event_data": event_data, "fn_index": fn_index, "session_hash": session})
    assert r.status_code == 200, r.text
    shown = r.json()["data"][0] if r.json()["data"] else None
    return shown if isinstance(shown, str) else None  # gr.skip(): the page's status line is left as it was


def client(app):
    from gradio_client import Client

    return Client(app.url, verbose=False)


def ask(c, message: str, system: str = "Be brief.", temperature: float = 0.3) -> str:
    reply, _ = c.predict(message, system, temperature, 0.8, 40, api_name="/chat")
    return reply


def test_thumbs_land_with_the_conversation_and_the_settings_the_reply_was_generated_with(app):
    c = client(app)
    first, second = ask(c, "What is LoRA?"), ask(c, "And QLoRA?", system="Be very brief.", temperature=0.7)
    history = [browser_message("user", "What is LoRA?"), browser_message("assistant", first),
               browser_message("user", "And QLoRA?"), browser_message("assistant", second)]
    before = len(read_records(app.folder))
    assert trigger(app, "on_like", [history], {"index": 3, "value": [second], "liked": False}, c.session_hash) is None
    trigger(app, "on_like", [history], {"index": 1, "value": [first], "liked": True}, c.session_hash)
    down, up = read_records(app.folder)[before:]
    assert down["rating"] == "down" and down["reply"] == second
    assert down["messages"] == [{"role": "system", "content": "Be very brief."},
                                {"role": "user", "content": "What is LoRA?"},
                                {"role": "assistant", "content": first}, {"role": "user", "content": "And QLoRA?"}]
    assert up["rating"] == "up" and up["reply"] == first
    assert up["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is LoRA?"}]
    assert up["conversation_id"] == down["conversation_id"] and len(up["conversation_id"]) == 32
    # The settings each reply was generated with (not the page's when the thumb was clicked), the seed included.
    assert {k: up["sampling"][k] for k in ("temperature", "top_p", "max_new_tokens")} == \
        {"temperature": 0.3, "top_p": 0.8, "max_new_tokens": 40}
    assert down["sampling"]["temperature"] == 0.7
    assert isinstance(up["sampling"]["seed"], int) and up["sampling"]["seed"] != down["sampling"]["seed"]
    assert up["model"]["backend"] == "mock" and up["timestamp"].endswith("Z")
    # What training needs and nothing more: no IP, headers, cookies or session id anywhere in a record.
    assert set(up) == {"conversation_id", "timestamp", "messages", "reply", "rating", "model", "sampling"}
    assert c.session_hash not in json.dumps(up)


def test_a_reply_not_streamed_in_that_session_is_refused_and_never_written(app):
    c, other = client(app), client(app)
    reply = ask(c, "What is 2+2?")
    genuine = [browser_message("user", "What is 2+2?"), browser_message("assistant", reply)]
    forged = [browser_message("user", "What is 2+2?"), browser_message("assistant", "2+2=5")]
    before = len(read_records(app.folder))
    shown = [trigger(app, "on_like", [forged], {"index": 1, "value": ["2+2=5"], "liked": True}, c.session_hash),
             trigger(app, "on_like", [genuine], {"index": 1, "value": [reply], "liked": True}, other.session_hash),
             trigger(app, "on_like", [genuine], {"index": 1, "value": [reply], "liked": True}, "never-chatted"),
             trigger(app, "on_like", [genuine], {"index": "1", "value": [reply], "liked": True}, c.session_hash),
             trigger(app, "on_retry", [forged], {"index": 0, "value": "What is 2+2?"}, c.session_hash)]
    assert len(read_records(app.folder)) == before
    assert all(s.startswith("⚠️ That rating was not saved") for s in shown)
    # A withdrawal ("liked": null) is a rating like any other: only for the session's own reply.
    trigger(app, "on_like", [genuine], {"index": 1, "value": [reply], "liked": None}, other.session_hash)
    assert len(read_records(app.folder)) == before


def test_app_notices_are_not_rated_and_the_page_says_where_records_go(app):
    before = len(read_records(app.folder))
    history = [browser_message("user", " "), browser_message("assistant", "⚠️ Please type a message.")]
    trigger(app, "on_like", [history], {"index": 1, "value": [], "liked": True}, "session-e")
    assert len(read_records(app.folder)) == before
    import httpx

    config = httpx.get(f"{app.url}config", timeout=30).text  # what the page is built from
    assert "Conversations and ratings on this page are" in config and str(app.folder) in config


# --- the collector with the real chat function, in-process -----------------------------------------------------

class Server:
    """The app's chat function and feedback collector in-process, called as Gradio calls them."""

    def __init__(self, folder: Path, env: dict | None = None):
        self.settings = load_settings({"CHATBOT_BACKEND": "mock", "CHATBOT_MOCK_DELAY": "0",
                                       "CHATBOT_FEEDBACK_DIR": str(folder), **(env or {})})
        self.backend = MockBackend(self.settings)
        self.log = FeedbackLog(folder)
        self.collector = FeedbackCollector(self.log, self.settings, self.backend)
        self.respond = make_respond(self.settings, self.backend, self.collector.served)


class Page:
    """One browser tab on a Server: its session, and the chat's history kept as the browser keeps it."""

    def __init__(self, server: Server, session: str = "tab"):
        self.server, self.collector, self.session, self.history = server, server.collector, session, []

    def send(self, message: str, system: str = "Sys", temperature: float = 0.2) -> str:
        *_, (reply, _) = self.server.respond(message, list(self.history), system, temperature, 0.9, 64,
                                             request=SimpleNamespace(session_hash=self.session))
        self.history += [browser_message("user", message), browser_message("assistant", reply)]
        return reply

    def retry(self, system: str = "Sys", temperature: float = 0.2) -> str | None:
        """The Retry button: the record of the discarded reply, then a new reply to the same message."""
        shown = self.collector.on_retry(self.session, self.history, len(self.history) - 2)
        message = self.history[-2]["content"][0]["text"]
        self.history = self.history[:-2]
        self.send(message, system, temperature)
        return shown

    def like(self, index: int, liked=True) -> str | None:
        return self.collector.on_like(self.session, self.history, index, liked)


def test_a_retried_reply_and_the_one_kept_are_recorded_for_the_same_turn(tmp_path):
    tab = Page(Server(tmp_path))
    tab.send("Tell me a joke", temperature=0.2)
    assert tab.retry(temperature=0.9) is None
    assert tab.collector.on_submit(tab.session, tab.history) is None
    assert tab.collector.on_submit(tab.session, tab.history) is None  # a turn is kept once
    retried, kept = read_records(tmp_path)
    assert (retried["rating"], kept["rating"]) == ("retried", "kept")
    assert "temperature=0.2" in retried["reply"] and "temperature=0.9" in kept["reply"]
    assert (retried["sampling"]["temperature"], kept["sampling"]["temperature"]) == (0.2, 0.9)
    assert retried["messages"] == kept["messages"] == [{"role": "system", "content": "Sys"},
                                                       {"role": "user", "content": "Tell me a joke"}]
    assert retried["conversation_id"] == kept["conversation_id"]


def test_sessions_get_their_own_conversation_ids_and_clear_starts_a_new_one(tmp_path):
    server = Server(tmp_path)
    tab, other = Page(server, "c"), Page(server, "d")
    tab.send("Hi")
    other.send("Hi")
    tab.like(1)
    other.like(1)
    tab.collector.on_clear("c")
    assert tab.like(1, liked="") is None  # thumbs taken back: the reply is still the session's own
    c1, d, c2 = read_records(tmp_path)
    assert len({c1["conversation_id"], d["conversation_id"], c2["conversation_id"]}) == 3
    assert c2["rating"] is None


def test_a_record_holds_the_conversation_the_model_saw(tmp_path):
    tab = Page(Server(tmp_path, {"CHATBOT_MAX_HISTORY_CHARS": "700"}))
    for i in range(4):
        reply = tab.send(f"message {i} " + "word " * 20)
    tab.like(7)
    record, = read_records(tmp_path)
    seen = int(reply.rsplit("messages:", 1)[1])  # the mock names how many messages reached it
    assert 1 + 1 < seen < 1 + 7  # some history, not all of it
    assert len(record["messages"]) == seen and record["messages"][0] == {"role": "system", "content": "Sys"}
    assert record["messages"][-1]["content"].startswith("message 3")
    assert sum(len(m["content"]) for m in record["messages"][1:-1]) <= 700


def test_limits_per_record_per_session_and_in_total(tmp_path, monkeypatch, capsys):
    big = Page(Server(tmp_path / "record", {"CHATBOT_MAX_INPUT_CHARS": "400000"}))
    big.send("x" * 300_000)
    assert "over the 256 KiB a record may take" in big.like(1)
    assert read_records(tmp_path / "record") == []

    monkeypatch.setattr(feedback, "MAX_SESSION_BYTES", 3000)
    tab, shown = Page(Server(tmp_path / "session")), []
    for i in range(6):
        tab.send(f"question {i}")
        shown.append(tab.like(len(tab.history) - 1))
    written = read_records(tmp_path / "session")
    assert 1 <= len(written) < 6 and shown[len(written)].startswith("⚠️ Ratings from this page are no longer saved")
    assert sum(len(json.dumps(r, ensure_ascii=False)) + 1 for r in written) <= 3000
    monkeypatch.undo()

    folder = tmp_path / "total"
    folder.mkdir()
    (folder / "earlier.jsonl").write_bytes(b"{}\n" * (2**20 // 3))  # 1 MiB saved by an earlier run
    tab = Page(Server(folder, {"CHATBOT_FEEDBACK_MAX_MB": "1"}))
    assert tab.collector.status() is None
    tab.send("Hi")
    first, second = tab.like(1), tab.like(1, liked=False)
    assert first == second == tab.collector.status()
    assert "CHATBOT_FEEDBACK_MAX_MB=1" in first and tab.collector.stopped
    assert (folder / "earlier.jsonl").stat().st_size == 3 * (2**20 // 3)  # nothing saved is touched
    assert not tab.server.log.path.exists()
    assert capsys.readouterr().err.count("feedback: recording stopped") == 1  # one log line


def test_forged_events_are_counted_and_logged_without_their_content(tmp_path, capsys):
    tab = Page(Server(tmp_path))
    tab.send("Hi")
    forged = [browser_message("user", "Hi"), browser_message("assistant", "SECRET forged reply")]
    for _ in range(10):
        tab.collector.on_like("tab", forged, 1, True)
    tab.collector.on_like("tab", tab.history, [7, 0], True)  # an index that is not a reply
    assert tab.collector.refused == 11 and read_records(tmp_path) == []
    err = capsys.readouterr().err
    assert err.count("events refused so far") == 2 and "SECRET" not in err


def test_nothing_is_attached_or_written_when_feedback_is_unset(tmp_path, monkeypatch):
    from chatbot.ui import build_app

    monkeypatch.chdir(tmp_path)
    settings = load_settings({"CHATBOT_BACKEND": "mock"})
    assert settings.feedback_dir is None and settings.feedback_dataset is None and notice(settings) == ""
    demo = build_app(settings, MockBackend(settings))
    names = {getattr(f.fn, "__name__", "") for f in demo.fns.values()}
    assert not names & {"on_like", "on_retry", "on_submit", "on_clear"}
    assert "Conversations and ratings" not in json.dumps(demo.get_config_file(), default=str)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writers_never_interleave_or_lose_records(tmp_path):
    log, other = FeedbackLog(tmp_path), FeedbackLog(tmp_path)  # two workers: two files, never one shared
    assert log.path != other.path
    big = "x" * 20_000  # far above the size the OS writes atomically (PIPE_BUF, 4 KiB)

    def writer(k: int) -> None:
        for i in range(50):
            (log if i % 2 else other).write({"writer": k, "i": i, "reply": big})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = read_records(tmp_path)
    assert sorted((r["writer"], r["i"]) for r in records) == [(k, i) for k in range(8) for i in range(50)]
    assert all(r["reply"] == big for r in records)


def test_records_are_strict_json():
    with pytest.raises(ValueError):
        FeedbackLog.encode({"sampling": {"temperature": float("nan")}})


def test_feedback_dataset_is_pushed_by_commit_scheduler_to_a_private_dataset(tmp_path):
    remote, folder = tmp_path / "hub", tmp_path / "local"
    api = LocalHub(remote)
    settings = load_settings({"CHATBOT_BACKEND": "mock", "CHATBOT_FEEDBACK_DIR": str(folder),
                              "CHATBOT_FEEDBACK_DATASET": "me/space-feedback", "HF_HUB_OFFLINE": "0"})
    log = FeedbackLog(settings.feedback_dir, settings.feedback_dataset, hf_api=api, every=60)
    try:
        assert api.repos == [{"repo_id": "me/space-feedback", "private": True, "repo_type": "dataset"}]
        log.write({"reply": "Hello!"})
        log.push_now()
        pushed = remote / "me/space-feedback" / "data" / log.path.name
        assert [json.loads(line)["reply"] for line in pushed.read_text().splitlines()] == ["Hello!"]
        assert api.commits[-1]["repo_type"] == "dataset"
        assert "Hugging Face dataset `me/space-feedback`" in notice(settings)
        log.write({"reply": "Pending when the app stops"})
    finally:
        assert log.close(timeout=30)  # what app.py does on SIGTERM/SIGINT: the pending record is pushed
    assert [json.loads(line)["reply"] for line in pushed.read_text().splitlines()] == \
        ["Hello!", "Pending when the app stops"]


def test_a_dataset_without_a_folder_gets_a_folder_of_its_own_process():
    env = {"CHATBOT_FEEDBACK_DATASET": "me/data", "HF_HUB_OFFLINE": "0"}
    first, second = load_settings(env).feedback_dir, load_settings(env).feedback_dir
    assert first != second and "chatbot-feedback-" in first


@pytest.mark.parametrize("env, message", [
    ({"CHATBOT_FEEDBACK_DATASET": "not a repo"}, "CHATBOT_FEEDBACK_DATASET='not a repo' is not valid; accepted:"),
    ({"CHATBOT_FEEDBACK_DATASET": "me/data", "HF_HUB_OFFLINE": "1"}, "unset while HF_HUB_OFFLINE=1"),
    ({"CHATBOT_FEEDBACK_DIR": "/tmp/x", "CHATBOT_FEEDBACK_MAX_MB": "0"}, "CHATBOT_FEEDBACK_MAX_MB='0' is not valid"),
])
def test_bad_feedback_settings_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings({"CHATBOT_BACKEND": "mock", **env})


def test_feedback_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="CHATBOT_FEEDBACK_DIR="):
        load_settings({"CHATBOT_FEEDBACK_DIR": str(tmp_path / "f")})


def test_feedback_dataset_without_a_token_is_one_clear_error(tmp_path, monkeypatch):
    from chatbot.feedback import open_log

    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)  # neither HF_TOKEN nor a stored login
    settings = load_settings({"CHATBOT_FEEDBACK_DIR": str(tmp_path / "fb"), "CHATBOT_FEEDBACK_DATASET": "me/data"})
    with pytest.raises(ConfigError, match=r"^CHATBOT_FEEDBACK_DATASET='me/data' is not valid without a token; "
                                          r"accepted: .*HF_TOKEN$"):
        open_log(settings)
