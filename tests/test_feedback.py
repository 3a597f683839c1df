"""Visitor feedback (chatbot/feedback.py): with CHATBOT_FEEDBACK_DIR set, thumbs and retries sent to the real Gradio
server the way the browser sends them land in the JSONL with the right conversation; with it unset nothing is
attached or written; concurrent writers never interleave or lose a record; CHATBOT_FEEDBACK_DATASET pushes through
huggingface_hub's CommitScheduler to a local stand-in for the Hub."""
from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from chatbot.backends.mock import MockBackend
from chatbot.feedback import FeedbackCollector, FeedbackLog, notice
from chatbot.settings import ConfigError, load_settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", demo=demo, folder=folder)
    demo.close()


def trigger(app, handler: str, data: list, event_data: dict | None, session: str) -> None:
    """Fire one of feedback.attach's listeners over HTTP exactly as the browser does (POST run/predict with the
    component values, the event's data and the page's session hash)."""
    import httpx

    fn_index = next(i for i, f in app.demo.fns.items() if getattr(f.fn, "__name__", "") == handler)
    r = httpx.post(f"{app.url}gradio_api/run/predict", timeout=30,
                   json={"data": data, "event_data": event_data, "fn_index": fn_index, "session_hash": session})
    assert r.status_code == 200, r.text


def page(app, handler: str = "on_like", **values) -> list:
    """The chat's Settings inputs as the page sends them (their defaults, with `values` by name)."""
    from chatbot.feedback import input_name

    fn = next(f for f in app.demo.fns.values() if getattr(f.fn, "__name__", "") == handler)
    return [values.get(input_name(c), c.value) for c in fn.inputs[1:]]


def ask(app, message: str, system: str = "Be brief.") -> str:
    from gradio_client import Client

    reply, _ = Client(app.url, verbose=False).predict(message, system, 0.3, 0.8, 40, api_name="/chat")
    return reply


def test_thumbs_land_in_the_jsonl_with_the_conversation_up_to_the_rated_reply(app):
    first, second = ask(app, "What is LoRA?"), ask(app, "And QLoRA?")
    history = [browser_message("user", "What is LoRA?"), browser_message("assistant", first),
               browser_message("user", "And QLoRA?"), browser_message("assistant", second)]
    before = len(read_records(app.folder))
    trigger(app, "on_like", [history, *page(app, system_prompt="Be brief.", temperature=0.3, top_p=0.8, max_new_tokens=40)], {"index": 3, "value": [second], "liked": False},
            "session-a")
    trigger(app, "on_like", [history, *page(app, system_prompt="Be brief.", temperature=0.3, top_p=0.8, max_new_tokens=40)], {"index": 1, "value": [first], "liked": True},
            "session-a")
    down, up = read_records(app.folder)[before:]
    assert down["rating"] == "down" and down["reply"] == second
    assert down["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is LoRA?"},
                                {"role": "assistant", "content": first}, {"role": "user", "content": "And QLoRA?"}]
    assert up["rating"] == "up" and up["reply"] == first
    assert up["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is LoRA?"}]
    assert up["conversation_id"] == down["conversation_id"] and len(up["conversation_id"]) == 32
    assert {k: up["sampling"][k] for k in ("temperature", "top_p", "max_new_tokens", "seed")} == \
        {"temperature": 0.3, "top_p": 0.8, "max_new_tokens": 40, "seed": None}
    assert "system_prompt" not in up["sampling"]
    assert up["model"]["backend"] == "mock" and up["timestamp"].endswith("Z")
    # What training needs and nothing more: no IP, headers, cookies or session id anywhere in a record.
    assert set(up) == {"conversation_id", "timestamp", "messages", "reply", "rating", "model", "sampling"}
    assert "session-a" not in json.dumps(up)


def test_a_retried_reply_and_the_one_kept_are_recorded_for_the_same_turn(app):
    history = [browser_message("user", "Tell me a joke"), browser_message("assistant", "No.")]
    before = len(read_records(app.folder))
    trigger(app, "on_retry", [history, *page(app, system_prompt="")], {"index": 0, "value": "Tell me a joke"}, "session-b")
    kept = [browser_message("user", "Tell me a joke"), browser_message("assistant", "Why did the GPU sigh? Too many layers.")]
    trigger(app, "on_submit", [kept, *page(app, system_prompt="")], None, "session-b")
    trigger(app, "on_submit", [kept, *page(app, system_prompt="")], None, "session-b")  # a turn is kept once
    retried, kept_record = read_records(app.folder)[before:]
    assert (retried["rating"], retried["reply"]) == ("retried", "No.")
    assert (kept_record["rating"], kept_record["reply"]) == ("kept", "Why did the GPU sigh? Too many layers.")
    assert retried["messages"] == kept_record["messages"] == [{"role": "user", "content": "Tell me a joke"}]
    assert retried["conversation_id"] == kept_record["conversation_id"]


def test_sessions_get_their_own_conversation_ids_and_clear_starts_a_new_one(app):
    history = [browser_message("user", "Hi"), browser_message("assistant", "Hello!")]
    like = {"index": 1, "value": ["Hello!"], "liked": True}
    before = len(read_records(app.folder))
    trigger(app, "on_like", [history, *page(app, system_prompt="")], like, "session-c")
    trigger(app, "on_like", [history, *page(app, system_prompt="")], like, "session-d")
    trigger(app, "on_clear", [], None, "session-c")
    trigger(app, "on_like", [history, *page(app, system_prompt="")], {**like, "liked": ""}, "session-c")  # thumbs taken back
    c1, d, c2 = read_records(app.folder)[before:]
    assert len({c1["conversation_id"], d["conversation_id"], c2["conversation_id"]}) == 3
    assert c2["rating"] is None


def test_app_notices_are_not_rated_and_the_page_says_where_records_go(app):
    before = len(read_records(app.folder))
    history = [browser_message("user", " "), browser_message("assistant", "⚠️ Please type a message.")]
    trigger(app, "on_like", [history, *page(app, system_prompt="")], {"index": 1, "value": [], "liked": True}, "session-e")
    assert len(read_records(app.folder)) == before
    import httpx

    config = httpx.get(f"{app.url}config", timeout=30).text  # what the page is built from
    assert "Conversations and ratings on this page are" in config and str(app.folder) in config


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


class LocalHub:
    """A stand-in for the Hub: huggingface_hub's real CommitScheduler talks to this HfApi, which writes commits into
    a local folder instead of the network."""

    def __new__(cls, remote: Path):
        from huggingface_hub import HfApi

        class Api(HfApi):
            def __init__(self):
                super().__init__(token="hf_fake")
                self.repos, self.commits = [], []

            def create_repo(self, repo_id, *, private=None, repo_type=None, exist_ok=False, **kwargs):
                self.repos.append({"repo_id": repo_id, "private": private, "repo_type": repo_type})
                return SimpleNamespace(repo_id=repo_id)

            def create_commit(self, repo_id, operations, *, commit_message="", repo_type=None, **kwargs):
                for op in operations:
                    target = remote / repo_id / op.path_in_repo
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(op.path_or_fileobj.read())
                self.commits.append({"repo_id": repo_id, "repo_type": repo_type,
                                     "files": [op.path_in_repo for op in operations]})
                return SimpleNamespace(oid=f"commit-{len(self.commits)}")

        return Api()


def test_feedback_dataset_is_pushed_by_commit_scheduler_to_a_private_dataset(tmp_path):
    remote, folder = tmp_path / "hub", tmp_path / "local"
    api = LocalHub(remote)
    settings = load_settings({"CHATBOT_BACKEND": "mock", "CHATBOT_FEEDBACK_DIR": str(folder),
                              "CHATBOT_FEEDBACK_DATASET": "me/space-feedback", "HF_HUB_OFFLINE": "0"})
    log = FeedbackLog(settings.feedback_dir, settings.feedback_dataset, hf_api=api, every=60)
    try:
        assert api.repos == [{"repo_id": "me/space-feedback", "private": True, "repo_type": "dataset"}]
        collector = FeedbackCollector(log, settings, MockBackend(settings))
        history = [browser_message("user", "Hi"), browser_message("assistant", "Hello!")]
        collector.on_like(history, {"system_prompt": "Sys", "temperature": 0.2}, SimpleNamespace(index=1, liked=True),
                          SimpleNamespace(session_hash="s"))
        log.push_now()
        pushed = remote / "me/space-feedback" / "data" / log.path.name
        assert [json.loads(line)["reply"] for line in pushed.read_text().splitlines()] == ["Hello!"]
        assert api.commits[-1]["repo_type"] == "dataset"
        assert "Hugging Face dataset `me/space-feedback`" in notice(settings)
    finally:
        log.scheduler.stop()


@pytest.mark.parametrize("env, message", [
    ({"CHATBOT_FEEDBACK_DATASET": "not a repo"}, "CHATBOT_FEEDBACK_DATASET='not a repo' is not valid; accepted:"),
    ({"CHATBOT_FEEDBACK_DATASET": "me/data", "HF_HUB_OFFLINE": "1"}, "unset while HF_HUB_OFFLINE=1"),
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
